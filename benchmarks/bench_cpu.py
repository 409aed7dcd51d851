"""CPU-side costs: export + transform pipeline time, graph size before/after the performance
transforms, and the engine's per-step host overhead (scheduling, input preparation, plans,
bookkeeping) apart from the graph's own work. Runs on the dev machine (no GPU).

    python benchmarks/bench_cpu.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import torch

from autodeploy import LLM, DeployConfig, SamplingParams
from autodeploy.export import export_model
from autodeploy.models import build_model, zoo_names
from autodeploy.transforms.pipeline import PERF_TRANSFORMS, cached_pipeline_plan, resolve_backends, run_pipeline

VIEWS = {"aten.view.default", "aten.reshape.default", "aten.transpose.int", "aten.unsqueeze.default",
         "aten.alias.default", "aten.slice.Tensor", "aten.sym_size.int", "<built-in function getitem>",
         "aten.squeeze.dim", "aten.expand.default", "aten.select.int"}
# the engine options the pipeline is timed with (CPU, float32, the torch backends)
CONFIG = DeployConfig(max_batch_size=8, max_seq_len=512, max_num_tokens=128, device="cpu")


def _graph_counts(gm) -> dict:
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    return {"nodes": len(calls), "compute_nodes": sum(str(n.target) not in VIEWS for n in calls)}


def pipeline_times(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        model = build_model(name) if name in zoo_names() else _deep_model()
        t0 = time.perf_counter()
        gm = export_model(model, max_seq_len=512)
        export_s = time.perf_counter() - t0
        before = _graph_counts(gm)
        t0 = time.perf_counter()
        infos = run_pipeline(gm, *cached_pipeline_plan(CONFIG, resolve_backends(CONFIG)))
        transform_s = time.perf_counter() - t0
        plain = export_model(model, max_seq_len=512)
        without_perf = dataclasses.replace(CONFIG, perf_transforms=dict.fromkeys(PERF_TRANSFORMS, False))
        run_pipeline(plain, *cached_pipeline_plan(without_perf, resolve_backends(without_perf)))
        row = {"model": name, "layers": model.config.num_hidden_layers, "export_s": export_s,
               "transforms_s": transform_s, "exported": before, "cached_without_perf": _graph_counts(plain),
               "cached_with_perf": _graph_counts(gm),
               "per_transform_ms": {i.name: 1e3 * i.seconds for i in infos}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _deep_model():
    """A 24-layer Llama-style model (hidden 256), for the pipeline's cost at depth."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=24,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def host_overhead(cases=((1, 4), (8, 4), (64, 4), (64, 512)), steps: int = 30) -> list[dict]:
    """Decode steps of the hybrid zoo model at (batch, prompt length): per step, the host's own
    work (schedule, draft, input fill, plans, bookkeeping) against the whole step; the graph's CPU
    execution is the rest. Long prompts show costs that grow with the sequence, not the batch."""
    rows = []
    model = build_model("hybrid")
    for bs, prompt in cases:
        llm = LLM(model, max_batch_size=bs, max_seq_len=prompt + steps + 8, max_num_tokens=max(64, bs, prompt))
        engine = llm.engine
        params = SamplingParams(max_tokens=steps + 2, ignore_eos=True)
        for i in range(bs):
            engine.add_request([(i + 7 * j) % model.config.vocab_size for j in range(prompt)], params)
        while any(not r.output for r in engine.requests.values()):
            engine.step()  # prefill
        engine.timings.clear()
        engine.runner.timings = dict.fromkeys(engine.runner.timings, 0.0)
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        total = (time.perf_counter() - t0) / steps
        e, r = engine.timings, engine.runner.timings
        host = (e["schedule"] + e["draft"] + e["post"] + r["fill"] + r["plan"]) / steps
        row = {"batch": bs, "prompt": prompt, "step_ms": 1e3 * total, "host_ms": 1e3 * host,
               "host_fraction": host / total, "parts_ms": {k: 1e3 * v / steps for k, v in {**e, **r}.items()}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(2)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__,
              "pipeline": pipeline_times(zoo_names() + ["llama-24-layers"]),
              "host_overhead": host_overhead()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
