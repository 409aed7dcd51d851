"""Decode step before/after each performance transform: graph nodes, kernel launches, step time.

The benchmark models (bf16, random seeded weights) are built once per configuration with the
performance transforms switched on one after another (``DeployConfig.perf_transforms``); each
configuration is measured at batch 1 and 64 in one process on one GPU:

* nodes: call_function nodes of the cached graph;
* kernels: CUDA kernels (and memcpy/memset) one eager decode step launches (torch.profiler);
* step ms: one decode step through the engine's runner with CUDA graphs (host input preparation,
  graph replay, logits copy), mean of 50.

    python benchmarks/bench_transforms.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from autodeploy import LLM
from autodeploy.models import build_model
from autodeploy.runtime.batch import LaneInput
from autodeploy.transforms.pipeline import PERF_TRANSFORMS

ORDER = ("match_rms_norm", "fuse_projections", "match_rope", "match_gated_activation", "fold_constants",
         "gather_logits")
CONTEXT = 200  # tokens already cached per sequence


def decode_lanes(bs: int, page_size: int) -> list[LaneInput]:
    pages = -(-(CONTEXT + 1) // page_size)
    return [LaneInput([7], CONTEXT, 1 + i, list(range(1 + i * pages, 1 + (i + 1) * pages))) for i in range(bs)]


def kernels_per_step(llm: LLM, lanes: list[LaneInput]) -> int:
    runner = llm.engine.runner
    args = runner._args(runner.inputs.fill(lanes))
    with torch.no_grad():
        runner.gm(*args)  # warm
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            runner.gm(*args)
            torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def step_ms(llm: LLM, lanes: list[LaneInput], repeat: int = 50) -> float:
    runner = llm.engine.runner
    for _ in range(5):
        runner.run(lanes)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        runner.run(lanes)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["bench-hybrid-0.6b", "bench-swa-0.7b"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--attn-backend", default="triton")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {"attn_backend": args.attn_backend, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "context": CONTEXT, "rows": []}
    for name in args.models:
        model = build_model(name, dtype=torch.bfloat16, device="cuda")
        for step in range(len(ORDER) + 1):
            on = set(ORDER[:step])
            perf = {t: t in on for t in PERF_TRANSFORMS}
            llm = LLM(model, dtype="bfloat16", device="cuda", compile_mode="cudagraph", max_batch_size=max(args.batch),
                      attn_backend=args.attn_backend, ssm_backend="triton",
                      max_seq_len=512, max_num_tokens=256, perf_transforms=perf)
            matches = {i.name: i.num_matches for i in llm.transform_infos if i.name in PERF_TRANSFORMS}
            row = {"model": name, "transforms": "+".join(ORDER[:step]) or "none",
                   "added": ORDER[step - 1] if step else None, "matches": matches,
                   "nodes": sum(n.op == "call_function" for n in llm.gm.graph.nodes)}
            for bs in args.batch:
                lanes = decode_lanes(bs, 16)
                row[f"kernels_bs{bs}"] = kernels_per_step(llm, lanes)
                row[f"step_ms_bs{bs}"] = step_ms(llm, lanes)
            print(json.dumps(row), flush=True)
            results["rows"].append(row)
            with open(os.path.join(args.out, "transforms.json"), "w") as f:  # after every row
                json.dump(results, f, indent=1)
            del llm
            torch.cuda.empty_cache()
        del model


if __name__ == "__main__":
    main()
