"""Every kernel of one decode step: name, launches, time (torch profiler over one eager run of the
cached graph; a captured graph replays the same kernels), per model and batch size, bf16, the
backends ``auto`` picks. With --ncu-step, one step runs between cudaProfilerStart/Stop so that
``ncu --profile-from-start off`` reads each kernel's DRAM bytes and time (bandwidth per kernel).

    python benchmarks/profile_step.py --models bench-hybrid-0.6b --batch 1 64 --out OUT
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import torch

from autodeploy import LLM
from autodeploy.models import build_model
from autodeploy.runtime.batch import LaneInput


def decode_lanes(batch: int, context: int) -> list[LaneInput]:
    pages = -(-(context + 1) // 16)
    return [LaneInput([7], context, 1 + i, list(range(1 + i * pages, 1 + (i + 1) * pages))) for i in range(batch)]


def kernel_table(runner, lanes) -> list[dict]:
    args = runner._args(runner.inputs.fill(lanes))
    runner._plan(captured=False)
    with torch.no_grad():
        for _ in range(3):
            runner.fn(*args)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            runner.fn(*args)
            torch.cuda.synchronize()
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name[e.name][0] += 1
            by_name[e.name][1] += e.device_time_total
    return sorted(({"kernel": k, "launches": n, "us": us} for k, (n, us) in by_name.items()), key=lambda r: -r["us"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["bench-hybrid-0.6b"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--top", type=int, default=1000, help="print this many kernels per step (the JSON has all)")
    ap.add_argument("--ncu-step", action="store_true", help="run one profiled step for ncu and stop")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    results = []
    for name in args.models:
        model = build_model(name, dtype=torch.bfloat16, device="cuda")
        llm = LLM(model, dtype="bfloat16", device="cuda", max_batch_size=max(args.batch),
                  max_seq_len=args.context + 16, max_num_tokens=max(256, max(args.batch)), compile_mode="eager")
        runner = llm.engine.runner
        for bs in args.batch:
            lanes = decode_lanes(bs, args.context)
            if args.ncu_step:
                args_ = runner._args(runner.inputs.fill(lanes))
                runner._plan(captured=False)
                with torch.no_grad():
                    runner.fn(*args_)
                    torch.cuda.synchronize()
                    torch.cuda.cudart().cudaProfilerStart()
                    runner.fn(*args_)
                    torch.cuda.synchronize()
                    torch.cuda.cudart().cudaProfilerStop()
                continue
            table = kernel_table(runner, lanes)
            row = {"model": name, "batch": bs, "backends": llm.record.backends,
                   "kernels": sum(r["launches"] for r in table), "kernel_us": sum(r["us"] for r in table),
                   "table": table}
            results.append(row)
            print(f"== {name} batch {bs}: {row['kernels']} kernels, {row['kernel_us']:.0f} us", flush=True)
            for r in table[:args.top]:
                print(f"{r['us']:8.1f} us {r['launches']:4d}x  {r['kernel'][:110]}")
        del llm, model, runner
        torch.cuda.empty_cache()
    if results:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
