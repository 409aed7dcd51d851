"""Tensor parallel on 2 GPUs: TP=2 against TP=1 on bench-hybrid-0.6b and bench-swa-0.7b (bf16),
CUDA graphs: greedy tokens (first divergence reported), decode tok/s at batch 1 and 64, and the
share of a decode step's GPU time spent in NCCL all-reduces.

    python benchmarks/bench_tp.py --tp1 OUT/tp1.json                               # one GPU
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --tp1 OUT/tp1.json --out OUT # compares
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from autodeploy import LLM, SamplingParams, distributed
from autodeploy.models import build_model

MODELS = ("bench-hybrid-0.6b", "bench-swa-0.7b")
PROMPT, NEW = 512, 64


def _prompts(bs: int) -> list[dict]:
    g = torch.Generator().manual_seed(bs)
    return [{"prompt_token_ids": torch.randint(0, 32000, (PROMPT,), generator=g).tolist()} for _ in range(bs)]


def _allreduce_share(llm: LLM, bs: int) -> float:
    """GPU time of NCCL kernels over all GPU kernel time in one eager decode step."""
    from autodeploy.runtime.batch import LaneInput

    runner = llm.engine.runner
    pages = -(-(PROMPT + 1) // 16)
    lanes = [LaneInput([7], PROMPT, 1 + i, list(range(1 + i * pages, 1 + (i + 1) * pages))) for i in range(bs)]
    args = runner._args(runner.inputs.fill(lanes))
    runner._plan(captured=False)
    with torch.no_grad():
        runner.gm(*args)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            runner.gm(*args)
            torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels)
    nccl = sum(e.self_device_time_total for e in kernels if "nccl" in e.key.lower())
    return nccl / total if total else 0.0


def run(world: int) -> dict:
    out = {}
    for name in MODELS:
        model = build_model(name, dtype=torch.bfloat16, device="cuda")
        for bs in (1, 64):
            llm = LLM(model, dtype="bfloat16", device="cuda", compile_mode="cudagraph", max_batch_size=bs,
                      max_seq_len=PROMPT + NEW, max_num_tokens=2048, attn_backend="triton", ssm_backend="triton")
            llm.generate(_prompts(1), SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
            engine, params = llm.engine, SamplingParams(max_tokens=NEW, ignore_eos=True)
            reqs = [engine.requests[engine.add_request(p["prompt_token_ids"], params)] for p in _prompts(bs)]
            while any(not r.output for r in reqs):  # prefill (every rank runs the same steps)
                engine.step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            while engine.has_unfinished():
                engine.step()
            torch.cuda.synchronize()
            decode_s = time.perf_counter() - t0
            row = {"decode_tok_s": sum(len(r.output) - 1 for r in reqs) / decode_s, "tokens": [r.output for r in reqs],
                   "cache_MiB": {p: b / 2**20 for p, b in llm.cache_bytes().items()}}
            if world > 1:
                row["allreduce_share"] = _allreduce_share(llm, bs)
            out[f"{name}/bs{bs}"] = row
            del llm
            torch.cuda.empty_cache()
        del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp1", required=True, help="TP=1 results: written without torchrun, read with it")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    world = distributed.launched_world_size()
    if world == 1:
        with open(args.tp1, "w") as f:
            json.dump(run(1), f)
        return
    mine = run(world)
    if distributed.rank() != 0:
        return
    with open(args.tp1) as f:
        ref = json.load(f)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tp": world, "rows": []}
    for key, row in mine.items():
        first_diff = []
        for a, b in zip(ref[key]["tokens"], row["tokens"]):
            first_diff.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None))
        r = {"case": key, "tp1_decode_tok_s": ref[key]["decode_tok_s"], f"tp{world}_decode_tok_s": row["decode_tok_s"],
             "speedup": row["decode_tok_s"] / ref[key]["decode_tok_s"],
             "sequences_identical": sum(d is None for d in first_diff), "sequences": len(first_diff),
             "first_divergence": [d for d in first_diff if d is not None][:8],
             "allreduce_share": row["allreduce_share"], "tp1_cache_MiB": ref[key]["cache_MiB"],
             f"tp{world}_cache_MiB_per_rank": row["cache_MiB"]}
        print(json.dumps(r), flush=True)
        report["rows"].append(r)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tp.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
