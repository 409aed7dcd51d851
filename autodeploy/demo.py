"""The main job on the embedded default: a tiny hybrid model (Mamba2 + sliding-window attention +
full attention, see models/hybrid.py), built from a config with seeded random weights, no download.

Builds the engine (export, transforms, cache pools), serves prompts of different lengths
concurrently with chunked prefill, and checks every token against transformers on the same
weights: its greedy decoding by uncached forwards (always) and its cached ``generate()``. The
second oracle has a known flaw: for some prompt lengths transformers' cached Mamba2 path departs
from its own uncached forward; those prompts are reported as such, not counted as ours. Prints a
short report; exits non-zero on a mismatch.
"""

from __future__ import annotations

import collections
import time

import torch

from autodeploy.api import LLM
from autodeploy.models import build_model
from autodeploy.models.reference import greedy_generate, greedy_uncached
from autodeploy.runtime.sampling import SamplingParams

DEFAULT_MODEL = "hybrid"


def run_demo(model_name: str = DEFAULT_MODEL, prompt_lens=(3, 17, 40, 90, 130, 8), new_tokens: int = 24) -> bool:
    model = build_model(model_name)
    print(f"model: {model_name} ({type(model).__name__}), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, float32, CPU")
    llm = LLM(model, max_batch_size=4, max_seq_len=256, max_num_tokens=48, page_size=16)
    print(f"build (export + transforms + pools): {llm.build_seconds:.2f} s")
    for info in llm.transform_infos:
        print("  " + info.summary())
    ops = collections.Counter(
        str(n.target).removeprefix("autodeploy.").removesuffix(".default") for n in llm.gm.graph.nodes
        if n.op == "call_function" and str(n.target).startswith("autodeploy.")
    )
    print("graph ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())))
    print("cache memory: " + ", ".join(f"{pool} {b / 1024:.0f} KiB" for pool, b in llm.cache_bytes().items()))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in prompt_lens]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"served {len(prompts)} prompts ({sum(prompt_lens)} prompt tokens) in {llm.engine.num_steps} steps, "
          f"{generated} tokens in {seconds:.2f} s ({generated / seconds:.0f} tok/s)")
    ok = True
    for p, o in zip(prompts, outs):
        tokens = o.outputs[0].token_ids
        forward, generate = greedy_uncached(model, p, new_tokens), greedy_generate(model, p, new_tokens)
        if tokens != forward:
            verdict, ok = "MISMATCH vs transformers' forward", False
        elif tokens == generate:
            verdict = "equal to transformers generate() and forward"
        else:
            verdict = "equal to transformers' forward (its cached generate() departs from its own forward here)"
        print(f"  prompt {len(p):4d} tokens -> {tokens[:6]}... {verdict}")
    print("OK" if ok else "FAILED")
    return ok
