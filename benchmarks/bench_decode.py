"""End-to-end decode throughput: autodeploy vs transformers generate() vs the bandwidth floor.

Same model, same GPU, one process: bench-hybrid-0.6b (autodeploy/models/zoo.py), bf16, random seeded
weights, a 512-token prompt per sequence and 128 new tokens (greedy). Decode tok/s counts the
tokens after the first one over the time after prefill. The floor is the bytes one decode step
must read (weights, plus KV and SSM/conv state of the batch) over the measured copy bandwidth.

    python benchmarks/bench_decode.py --batch 1 8 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from autodeploy import LLM, SamplingParams
from autodeploy.custom_ops import triton_pdl
from autodeploy.models import build_model


def copy_bandwidth() -> float:
    x = torch.empty(1 << 31, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t0)


def step_bytes(llm: LLM, weight_bytes: int, batch: int, context: float) -> float:
    """Bytes one decode step of ``batch`` lanes at ``context`` cached tokens must move: the weights
    once, every KV cache's keys/values the lanes attend to (a sliding-window layer's window, a full
    layer's whole context), and the SSM/conv states read and written."""
    total = weight_bytes
    for spec in llm.record.caches:
        per = math.prod(spec.shape) * spec.dtype.itemsize  # a kv spec's bytes per token; a state spec's bytes per slot
        if spec.kind == "kv":
            total += per * batch * (min(context, spec.window) if spec.window else context)
        elif spec.pool in ("ssm", "conv"):
            total += 2 * per * batch
    return total


def kernels_per_decode_step(llm: LLM, batch: int) -> int:
    """GPU kernels one eager run of the cached graph launches for a decode step of ``batch`` lanes
    (the captured graph replays the same kernels)."""
    from autodeploy.runtime.batch import LaneInput

    runner = llm.engine.runner
    pages = -(-513 // 16)
    lanes = [LaneInput([7], 512, 1 + i, list(range(1 + i * pages, 1 + (i + 1) * pages))) for i in range(batch)]
    args = runner._args(runner.inputs.fill(lanes))
    runner._plan(captured=False)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        runner.fn(*args)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def ours(llm: LLM, prompts: list[list[int]], new: int) -> dict:
    engine = llm.engine
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    reqs = [engine.requests[i] for i in ids]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while any(not r.output for r in reqs):
        engine.step()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    steps0 = engine.num_steps
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    for i in ids:
        engine.requests.pop(i)
    decoded = sum(len(r.output) - 1 for r in reqs)
    return {"ttft_s": t1 - t0, "decode_tok_s": decoded / (t2 - t1), "decode_steps": engine.num_steps - steps0,
            "step_ms": 1e3 * (t2 - t1) / max(engine.num_steps - steps0, 1)}


def hf(model, prompts: list[list[int]], new: int) -> float:
    ids = torch.tensor(prompts, device="cuda")
    model.generate(ids, max_new_tokens=4, do_sample=False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    torch.cuda.synchronize()
    return len(prompts) * new / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bench-hybrid-0.6b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--hf", action="store_true", help="also time transformers generate()")
    ap.add_argument("--compile", nargs="+", default=["cudagraph"], help="compile modes to time side by side")
    ap.add_argument("--configs", nargs="+", metavar="MODE:ATTN[:SSM[:FLAG...]]",
                    help="explicit (compile mode, attention backend[, SSM backend]) instead of --compile x --attn; "
                         "flags: 'sync' (async scheduling off), 'no-<transform>' / 'with-<transform>' (a perf "
                         "transform off / on), 'pdl' / 'no-pdl' (Triton kernels with / without programmatic "
                         "dependent launch; default: with)")
    ap.add_argument("--attn", nargs="+", default=["auto"], help="attention backends to time side by side")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--append", action="store_true", help="add the rows to an existing decode.json")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model = build_model(args.model, dtype=torch.bfloat16, device="cuda")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth()
    results = {"model": args.model, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "weights_GB": weight_bytes / 1e9, "copy_TBs": bw / 1e12, "rows": []}
    path = os.path.join(args.out, "decode.json")
    if args.append and os.path.exists(path):
        with open(path) as f:
            results["rows"] = json.load(f)["rows"]
    g = torch.Generator().manual_seed(0)
    configs = ([tuple((c.split(":") + ["auto"])[:3]) + (tuple(c.split(":")[3:]),) for c in args.configs]
               if args.configs else [(mode, attn, "auto", ()) for mode in args.compile for attn in args.attn])
    for bs, mode, attn, ssm, flags in [(bs, *c) for bs in args.batch for c in configs]:
        perf = ({f[3:]: False for f in flags if f.startswith("no-") and f != "no-pdl"}
                | {f[5:]: True for f in flags if f.startswith("with-")})
        triton_pdl.PDL_ENABLED = "no-pdl" not in flags  # read at each launch: CUDA graphs capture it
        prompts = torch.randint(0, model.config.vocab_size, (bs, args.prompt), generator=g).tolist()
        t0 = time.perf_counter()
        llm = LLM(model, dtype="bfloat16", device="cuda", max_batch_size=bs, page_size=16,
                  max_seq_len=args.prompt + args.new, max_num_tokens=max(2048, bs), compile_mode=mode,
                  attn_backend=attn, ssm_backend=ssm, perf_transforms=perf or None)
        llm.engine.async_scheduling = "sync" not in flags
        build = time.perf_counter() - t0
        # warm-up at the timed prompt length (another prompt): Triton compiles and allocator growth
        # for these shapes happen here, not in the timed TTFT (a 32-token warm-up left them there)
        ours(llm, [p[::-1] for p in prompts], 8)
        backends = llm.record.backends
        row = {"model": args.model, "batch": bs, "compile": mode, "attn": backends["attention"],
               "ssm": backends.get("ssm", ssm),
               "flags": list(flags), "kernels_per_step": kernels_per_decode_step(llm, bs),
               "build_s": build, "capture_s": llm.engine.runner.capture_seconds,
               "capture_sizes": sorted(llm.engine.runner.graphs),
               "capture_MiB": llm.engine.runner.capture_bytes / 2**20,
               **ours(llm, prompts, args.new)}
        row["floor_tok_s"] = bs * bw / step_bytes(llm, weight_bytes, bs, args.prompt + args.new / 2)
        row["fraction_of_floor"] = row["decode_tok_s"] / row["floor_tok_s"]
        timings = llm.engine.timings
        row["host_ms_per_step"] = {k: 1e3 * v / max(llm.engine.num_steps, 1) for k, v in
                                   {**timings, **llm.engine.runner.timings}.items()}
        if args.hf and (mode, attn, ssm, flags) == configs[0]:
            row["hf_tok_s"] = hf(model, prompts, min(args.new, 64))
            row["speedup_vs_hf"] = row["decode_tok_s"] / row["hf_tok_s"]
        print(json.dumps(row), flush=True)
        results["rows"].append(row)
        with open(path, "w") as f:  # after every row: a cut run keeps its rows
            json.dump(results, f, indent=1)
        del llm
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
