"""Plots (PNG) from the benchmark result files: decode throughput, the performance transforms,
sliding-window KV memory and prefill throughput. Runs anywhere (matplotlib, no GPU).

    python benchmarks/plot.py --results benchmarks/results --out benchmarks/plots
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def decode(data: dict, out: str) -> None:
    rows = data["rows"]
    batches = sorted({r["batch"] for r in rows})
    configs = sorted({(r["compile"], r["attn"], r.get("ssm", "triton")) for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / (len(configs) + 2)
    for i, (mode, attn, ssm) in enumerate(configs):
        ys = [next((r["decode_tok_s"] for r in rows if r["batch"] == b
                    and (r["compile"], r["attn"], r.get("ssm", "triton")) == (mode, attn, ssm)), 0) for b in batches]
        ax.bar([j + i * width for j in range(len(batches))], ys, width,
               label=f"autodeploy {mode}, attn {attn}, ssm {ssm}")
    hf = [next((r["hf_tok_s"] for r in rows if r["batch"] == b and "hf_tok_s" in r), 0) for b in batches]
    floor = [next(r["floor_tok_s"] for r in rows if r["batch"] == b) for b in batches]
    ax.bar([j + len(configs) * width for j in range(len(batches))], hf, width, label="transformers generate()")
    ax.bar([j + (len(configs) + 1) * width for j in range(len(batches))], floor, width, label="bandwidth floor",
           color="lightgray")
    ax.set_xticks([j + width * (len(configs) + 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s (log)")
    ax.set_title(f"bench-hybrid-0.6b decode, bf16, {data['gpu']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "decode.png"), dpi=120)


def transforms(datas: list[dict], out: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    by_model: dict[str, list[dict]] = {}
    for data in datas:
        for r in data["rows"]:
            by_model.setdefault(r["model"], []).append(r)
    for ax, bs in zip(axes, (1, 64)):
        for rows in by_model.values():
            labels = ["none"] + [r["added"].replace("match_", "") for r in rows[1:]]
            ax.plot(range(len(rows)), [r[f"step_ms_bs{bs}"] for r in rows], marker="o", label=rows[0]["model"])
        ax.set_xticks(range(len(labels)), [("+" if i else "") + label for i, label in enumerate(labels)], rotation=25,
                      fontsize=8)
        ax.set_ylabel("decode step ms (CUDA graphs)")
        ax.set_title(f"batch {bs}: transforms added one after another")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "transforms.png"), dpi=120)


def memory(rows: list[dict], out: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ctx = [r["context"] // 1024 for r in rows]
    ax.plot(ctx, [r["full_cache_MiB"] for r in rows], marker="o", label="full-length cache, every layer")
    ax.plot(ctx, [r["ours_MiB"] for r in rows], marker="o", label="autodeploy (rings for W=1024 layers)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ctx, [f"{c}k" for c in ctx])
    ax.set_xlabel("context")
    ax.set_ylabel("KV MiB per sequence (log)")
    ax.set_title("bench-swa-0.7b (5 sliding : 1 full), bf16")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "swa_memory.png"), dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--out", default="benchmarks/plots")
    ap.add_argument("--decode", default="decode.json")
    ap.add_argument("--transforms", nargs="+", default=["transforms.json"])
    ap.add_argument("--suite", default="suite.json")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = lambda name: os.path.join(args.results, name)  # noqa: E731
    if os.path.exists(path(args.decode)):
        decode(_load(path(args.decode)), args.out)
    if all(os.path.exists(path(f)) for f in args.transforms):
        transforms([_load(path(f)) for f in args.transforms], args.out)
    suite = _load(path(args.suite)) if os.path.exists(path(args.suite)) else {}
    if isinstance(suite.get("memory"), list):
        memory(suite["memory"], args.out)
    print("wrote", sorted(os.listdir(args.out)))


if __name__ == "__main__":
    main()
