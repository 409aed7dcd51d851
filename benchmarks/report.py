"""Markdown tables from the benchmark result files (decode.json, transforms.json, suite.json), so a
run's numbers reach RESULTS.md as printed. Runs anywhere (no GPU, no matplotlib).

    python benchmarks/report.py --results benchmarks/results > run.md
"""

from __future__ import annotations

import argparse
import json
import os

HOST_PARTS = ("schedule", "fill", "plan", "post")  # the engine's host work per step (timings keys)


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def decode(data: dict) -> str:
    head = (f"### Decode throughput ({data['gpu']}, torch {data['torch']}; copy {data['copy_TBs']:.2f} TB/s)\n\n")
    rows = [[r.get("model", data["model"]), r["batch"], r["compile"], r["attn"], r.get("ssm", "triton"),
             " ".join(r.get("flags", [])), r.get("kernels_per_step"), r["decode_tok_s"], r["step_ms"],
             f"{100 * r['fraction_of_floor']:.1f} %", r.get("hf_tok_s"),
             f"{r['speedup_vs_hf']:.1f}x" if "speedup_vs_hf" in r else None, r["ttft_s"],
             ", ".join(f"{k} {v:.2f}" for k, v in r.get("host_ms_per_step", {}).items() if k in HOST_PARTS)]
            for r in data["rows"]]
    return head + _table(["model", "batch", "compile", "attention", "ssm", "options off", "kernels / step", "tok/s",
                          "step ms", "of floor", "transformers tok/s", "vs transformers", "TTFT s", "host ms/step"],
                         rows)


def transforms(data: dict) -> str:
    batches = sorted({int(k.removeprefix("step_ms_bs")) for r in data["rows"] for k in r if k.startswith("step_ms_bs")})
    rows = [[r["model"], ("+ " + r["added"]) if r["added"] else "none", r["nodes"],
             *[r.get(f"kernels_bs{b}") for b in batches[:1]], *[r.get(f"step_ms_bs{b}") for b in batches]]
            for r in data["rows"]]
    return (f"### Performance transforms ({data['gpu']}, attention {data['attn_backend']}, "
            f"context {data['context']})\n\n"
            + _table(["model", "transforms", "graph nodes", "kernels / step",
                      *[f"step ms, batch {b}" for b in batches]], rows))


def suite(data: dict) -> str:
    out = []
    if isinstance(data.get("profile"), list):
        rows = [[r["model"], r["kind"], r.get("batch", r.get("tokens")), r["step_us"], r.get("replay_us"),
                 r.get("kernel_us"), r.get("kernels"), r.get("gaps_us"), r.get("host_us", r.get("host_and_gaps_us")),
                 r.get("weights_floor_us"), "; ".join(f"{t['kernel'][:40]} {t['us']:.0f}" for t in r["top"][:4])]
                for r in data["profile"]]
        out.append("### Step profile (µs)\n\n" + _table(
            ["model", "step", "batch / tokens", "step", "graph replay", "kernel sum", "kernels", "gaps in graph",
             "host", "weights / copy bandwidth", "top kernels (µs)"], rows))
    if isinstance(data.get("prefill"), list):
        rows = [[r["model"], r["prompt"], r["chunk"], {True: "graph", False: "eager"}.get(r.get("captured")),
                 r["ttft_s"], r["prefill_tok_s"], r.get("hf_forward_s"),
                 f"{r['speedup_vs_hf']:.2f}x" if "speedup_vs_hf" in r else None] for r in data["prefill"]]
        out.append("### Prefill\n\n" + _table(["model", "prompt", "chunk", "chunks run", "TTFT s", "prefill tok/s",
                                               "transformers forward s", "vs transformers"], rows))
    if isinstance(data.get("overhead"), list):
        rows = [[r["op"], r["batch"], r["raw_us"], r["ours_us"], f"{100 * r['overhead']:+.0f} %",
                 ", ".join(f"{k.removesuffix('_us')} {r[k]:.0f}" for k in ("csr_lists_us", "plan_us", "device_half_us")
                           if k in r)] for r in data["overhead"]]
        out.append("### Op overhead at decode (µs)\n\n" + _table(["op", "batch", "raw kernel", "ours", "overhead",
                                                                   "parts"], rows))
    if isinstance(data.get("memory"), list):
        rows = [[r["context"], r["ours_MiB"], r["full_cache_MiB"], f"{100 * r['fraction']:.2f} %",
                 f"{r['seqs_in_budget_ours']} / {r['seqs_in_budget_full']}"] for r in data["memory"]]
        out.append("### Sliding-window KV memory\n\n" + _table(
            ["context", "ours MiB / seq", "full cache MiB / seq", "fraction", "sequences in budget: ours / full"],
            rows))
    if isinstance(data.get("spec"), list):
        rows = [[r["method"], r["k"], r["tok_s"], f"{r['speedup']:.2f}x" if "speedup" in r else None,
                 r.get("mean_accepted_length"), r.get("replay_MiB"), r.get("state_copies_MiB"), r.get("same_tokens")]
                for r in data["spec"]]
        out.append("### Speculative decoding, batch 1\n\n" + _table(
            ["method", "K", "tok/s", "vs none", "mean accepted length", "replay MiB", "(1 + K) state copies MiB",
             "same tokens as none"], rows))
    failed = [f"{k}: {v['error']}" for k, v in data.items() if isinstance(v, dict) and "error" in v]
    if failed:
        out.append("Sections that failed: " + "; ".join(failed))
    return "\n\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args()
    parts = []
    for name, render in (("decode.json", decode), ("transforms.json", transforms), ("suite.json", suite)):
        path = os.path.join(args.results, name)
        if os.path.exists(path):
            with open(path) as f:
                parts.append(render(json.load(f)))
    print("\n\n".join(parts) if parts else f"no result files in {args.results}")


if __name__ == "__main__":
    main()
