"""Tensor parallel on 2 GPUs: TP=2 against TP=1 on bench-hybrid-0.6b and bench-swa-0.7b (bf16),
CUDA graphs: greedy tokens (first divergence reported), teacher-forced logits (TP=1's own
continuation fed to both: max |difference| over max |logit|, same argmax), decode tok/s at batch 1
and 64, and the all-reduces' share of a captured decode step (the same step replayed from a copy
of the graph whose all-reduces are removed: timing only, its numbers are wrong).

    python benchmarks/bench_tp.py --tp1 OUT/tp1.json                               # one GPU
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --tp1 OUT/tp1.json --out OUT # compares
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from autodeploy import LLM, SamplingParams, distributed
from autodeploy.models import build_model
from autodeploy.runtime.batch import LaneInput
from autodeploy.runtime.runner import GraphRunner

MODELS = ("bench-hybrid-0.6b", "bench-swa-0.7b")
PROMPT, NEW = 512, 64
BATCHES = (1, 64)
DEVICE = "cuda"  # --device cpu: a dry run of the script's logic on small zoo models (gloo, eager)


def _sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def _prompts(bs: int) -> list[dict]:
    g = torch.Generator().manual_seed(bs)
    return [{"prompt_token_ids": torch.randint(0, 256, (PROMPT,), generator=g).tolist()} for _ in range(bs)]


def _decode_lanes(bs: int) -> list[LaneInput]:
    pages = -(-(PROMPT + 1) // 16)
    return [LaneInput([7], PROMPT, 1 + i, list(range(1 + i * pages, 1 + (i + 1) * pages))) for i in range(bs)]


def _allreduce_share(llm: LLM, bs: int) -> float:
    """1 - (captured decode step without the all-reduces) / (the same step with them)."""
    ALL_REDUCE = torch.ops.autodeploy.all_reduce.default
    gm = copy.deepcopy(llm.gm)
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target == ALL_REDUCE]:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    gm.recompile()
    lanes = _decode_lanes(bs)
    times = []
    mode = llm.engine.runner.mode
    for runner in (llm.engine.runner, GraphRunner(gm, llm.engine.sizes, llm.config.device, mode, [bs])):
        for _ in range(5):
            runner.run(lanes)
        _sync()
        t0 = time.perf_counter()
        for _ in range(50):
            runner.run(lanes)
        _sync()
        times.append(time.perf_counter() - t0)
    return 1 - times[1] / times[0]


def _forced_logits(llm: LLM, sequences: list[list[int]]) -> torch.Tensor:
    """Last-token logits of each sequence, prefilled on a fresh lane: [len(sequences), vocab] float32."""
    return torch.stack([llm.engine.runner.run([LaneInput(seq, 0, 1, list(range(1, 1 + -(-len(seq) // 16))))])[-1]
                        .float().cpu() for seq in sequences])


def run(world: int, tp1: dict | None) -> dict:
    out = {}
    gpu = DEVICE.startswith("cuda")
    for name in MODELS:
        model = build_model(name, dtype=torch.bfloat16 if gpu else torch.float32, device=DEVICE)
        for bs in BATCHES:
            llm = LLM(model, dtype="bfloat16" if gpu else "float32", device=DEVICE,
                      compile_mode="cudagraph" if gpu else "eager", max_batch_size=bs, max_seq_len=PROMPT + NEW,
                      max_num_tokens=2048, attn_backend="triton" if gpu else "torch",
                      ssm_backend="triton" if gpu else "torch")
            llm.generate(_prompts(1), SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
            engine, params = llm.engine, SamplingParams(max_tokens=NEW, ignore_eos=True)
            reqs = [engine.requests[engine.add_request(p["prompt_token_ids"], params)] for p in _prompts(bs)]
            while any(not r.output for r in reqs):  # prefill (every rank runs the same steps)
                engine.step()
            _sync()
            t0 = time.perf_counter()
            while engine.has_unfinished():
                engine.step()
            _sync()
            decode_s = time.perf_counter() - t0
            row = {"decode_tok_s": sum(len(r.output) - 1 for r in reqs) / decode_s, "tokens": [r.output for r in reqs],
                   "cache_MiB": {p: b / 2**20 for p, b in llm.cache_bytes().items()}}
            key = f"{name}/bs{bs}"
            forced_from = tp1[key]["tokens"] if tp1 is not None else row["tokens"]  # TP=1's continuation
            sequences = [p["prompt_token_ids"] + t[:-1] for p, t in zip(_prompts(bs), forced_from)][:4]
            forced = _forced_logits(llm, sequences)  # every rank runs it (collectives); rank 0 keeps it
            if distributed.rank() == 0:
                torch.save(forced, f"/tmp/tp{world}_{key.replace('/', '_')}.pt")
            if world > 1:
                row["allreduce_share"] = _allreduce_share(llm, bs)
            out[key] = row
            del llm
            if gpu:
                torch.cuda.empty_cache()
    return out


def _logit_agreement(key: str, world: int) -> dict:
    a = torch.load(f"/tmp/tp1_{key.replace('/', '_')}.pt")
    b = torch.load(f"/tmp/tp{world}_{key.replace('/', '_')}.pt")
    return {"forced_logits_max_rel_diff": float((a - b).abs().max() / a.abs().max()),
            "forced_argmax_equal": int((a.argmax(-1) == b.argmax(-1)).sum()), "forced_sequences": a.shape[0]}


def main() -> None:
    global DEVICE, MODELS, BATCHES, PROMPT, NEW
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp1", required=True, help="TP=1 results: written without torchrun, read with it")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt", type=int, default=PROMPT)
    ap.add_argument("--new", type=int, default=NEW)
    args = ap.parse_args()
    DEVICE, MODELS, BATCHES, PROMPT, NEW = args.device, tuple(args.models), tuple(args.batch), args.prompt, args.new
    world = distributed.launched_world_size()
    if world == 1:
        with open(args.tp1, "w") as f:
            json.dump(run(1, None), f)
        return
    with open(args.tp1) as f:
        ref = json.load(f)
    mine = run(world, ref)
    if distributed.rank() != 0:
        return
    report = {"gpu": torch.cuda.get_device_name() if DEVICE.startswith("cuda") else "cpu", "torch": torch.__version__,
              "tp": world, "rows": []}
    for key, row in mine.items():
        first_diff = []
        for a, b in zip(ref[key]["tokens"], row["tokens"]):
            first_diff.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None))
        r = {"case": key, "tp1_decode_tok_s": ref[key]["decode_tok_s"], f"tp{world}_decode_tok_s": row["decode_tok_s"],
             "speedup": row["decode_tok_s"] / ref[key]["decode_tok_s"],
             "sequences_identical": sum(d is None for d in first_diff), "sequences": len(first_diff),
             "first_divergence": [d for d in first_diff if d is not None][:8],
             "allreduce_share": row["allreduce_share"], "tp1_cache_MiB": ref[key]["cache_MiB"],
             **_logit_agreement(key, world),
             f"tp{world}_cache_MiB_per_rank": row["cache_MiB"]}
        print(json.dumps(r), flush=True)
        report["rows"].append(r)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tp.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
