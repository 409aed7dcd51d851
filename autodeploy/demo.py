"""The main job on the embedded default: a tiny hybrid (Mamba2 + attention) model, no download.

Builds the model from a config with seeded random weights, exports it, runs the transform
pipeline, and checks the transformed graph's logits against the transformers module at two
sequence lengths through the same graph. Prints a short report; exits non-zero on a mismatch.
"""

from __future__ import annotations

import collections
import time

import torch

from autodeploy.export import export_model
from autodeploy.models import build_model
from autodeploy.transforms import run_pipeline

DEFAULT_MODEL = "nemotron_h"
LOGITS_ATOL = 2e-5  # float32, same weights: only reduction order differs


def run_demo(model_name: str = DEFAULT_MODEL, lengths: tuple[int, ...] = (9, 70)) -> bool:
    torch.manual_seed(0)
    model = build_model(model_name)
    print(f"model: {model_name} ({type(model).__name__}), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, float32, CPU")
    start = time.perf_counter()
    gm = export_model(model, max_seq_len=256)
    export_s = time.perf_counter() - start
    infos = run_pipeline(gm)
    print(f"export: {export_s:.2f} s, {len(gm.graph.nodes)} nodes")
    for info in infos:
        print("  " + info.summary())
    ops = collections.Counter(
        str(n.target).removesuffix(".default") for n in gm.graph.nodes
        if n.op == "call_function" and str(n.target).startswith("autodeploy.")
    )
    print("canonical ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())))
    ok = True
    for length in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length))
        pos = torch.arange(length)[None]
        with torch.no_grad():
            ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits
            out = gm(ids, pos)
        err = (out - ref).abs().max().item()
        same_argmax = torch.equal(out.argmax(-1), ref.argmax(-1))
        status = "ok" if err <= LOGITS_ATOL and same_argmax else "MISMATCH"
        ok &= status == "ok"
        print(f"length {length:4d}: max |logits - transformers| = {err:.2e} (tol {LOGITS_ATOL:.0e}), "
              f"greedy tokens equal: {same_argmax} -> {status}")
    return ok
