"""One-row linear layers at the weight shapes of the benchmark models: cuBLAS (``F.linear``)
against the Triton GEMV of ``autodeploy::linear`` (custom_ops/triton_gemv.py) with its default
tiles and, with --sweep, others, as achieved bandwidth (weight + input + output bytes over the
time; CUDA-graph replays of 20 launches over rotating weight copies, so the 60 MB L2 never holds a
weight) against the measured copy bandwidth.

    python benchmarks/bench_gemv.py --out benchmarks/results [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import json
import operator
import os

import torch
import torch.nn.functional as F
from bench_decode import copy_bandwidth

from autodeploy.custom_ops.triton_gemv import gemv_config, triton_gemv
from autodeploy.models import build_model


def weight_shapes(names: list[str]) -> list[tuple[int, int]]:
    """The distinct [out, in] shapes of the linear layers the engine runs (after projection fusion)."""
    from autodeploy import LLM

    shapes = set()
    for name in names:
        model = build_model(name, dtype=torch.bfloat16, device="cuda")
        llm = LLM(model, dtype="bfloat16", device="cuda", max_batch_size=1, max_seq_len=64, compile_mode="eager")
        for node in llm.gm.graph.nodes:
            if node.op == "call_function" and "linear" in str(node.target):
                weight = node.args[1]
                shapes.add(tuple(operator.attrgetter(weight.target)(llm.gm).shape if weight.op == "get_attr"
                                 else weight.meta["val"].shape))
        del llm, model
        torch.cuda.empty_cache()
    return sorted(shapes)


def time_us(fn, copies: int) -> float:
    """Median microseconds per launch: a CUDA graph of 20 launches cycling through ``copies``
    weight copies, replayed 20 times."""
    fn(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(20):
            fn(i % copies)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / 20)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["bench-hybrid-0.6b", "bench-swa-0.7b"])
    ap.add_argument("--sweep", action="store_true", help="also time other tile sizes")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    bw = copy_bandwidth()
    rows_out = []
    shapes = weight_shapes(args.models)
    g = torch.Generator(device="cuda").manual_seed(0)
    m = 1
    for n, k in shapes:
        copies = max(2, -(-240_000_000 // (n * k * 2)))  # > 4x the L2 across copies
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02 for _ in range(copies)]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
        ref = (x.double() @ ws[0].double().T)
        err = ((triton_gemv(x, ws[0]).double() - ref).norm() / ref.norm()).item()
        err_cublas = ((F.linear(x, ws[0]).double() - ref).norm() / ref.norm()).item()
        moved = n * k * 2 + m * (n + k) * 2
        cublas = time_us(lambda i: F.linear(x, ws[i]), copies)
        default = gemv_config(n, k)
        configs = [default]
        if args.sweep:
            for bn, bk, warps, stages in itertools.product((4, 8, 16, 32, 64), (128, 256, 512, 1024, 2048), (4, 8),
                                                           (1, 3)):
                if bn * bk > 32768:
                    continue
                configs.append({"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages})
        timed = []
        for cfg in configs:
            try:
                timed.append((time_us(lambda i: triton_gemv(x, ws[i], config=cfg), copies), cfg))
            except Exception as e:  # a tile that does not fit shared memory: skipped, named
                print(f"  skip {cfg}: {type(e).__name__}", flush=True)
        ours = timed[0][0]
        best_us, best_cfg = min(timed, key=lambda t: t[0])
        row = {"n": n, "k": k, "rows": m, "cublas_us": cublas, "triton_us": ours, "best_us": best_us,
               "best_config": best_cfg, "default_config": default, "cublas_of_copy": moved / (cublas * 1e-6) / bw,
               "triton_of_copy": moved / (ours * 1e-6) / bw, "best_of_copy": moved / (best_us * 1e-6) / bw,
               "rel_err": err, "rel_err_cublas": err_cublas}
        print(json.dumps(row), flush=True)
        rows_out.append(row)
        ws.clear()  # frees the copies before the next shape
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gemv.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_TBs": bw / 1e12,
                   "rows": rows_out}, f, indent=1)
    print(f"{'shape':>14} {'cuBLAS us':>9} {'ours us':>8} {'best us':>8} {'cuBLAS':>7} {'ours':>6} {'best':>6}")
    for r in rows_out:
        print(f"{r['n']:>6}x{r['k']:<7} {r['cublas_us']:9.1f} {r['triton_us']:8.1f} {r['best_us']:8.1f} "
              f"{r['cublas_of_copy']:7.0%} {r['triton_of_copy']:6.0%} {r['best_of_copy']:6.0%}")


if __name__ == "__main__":
    main()
