"""The demo on the embedded default: a tiny hybrid model (Mamba2 + sliding-window attention +
full attention, see models/hybrid.py), built from a config with seeded random weights, no download.

Builds the engine (export, transforms, cache pools), serves prompts of different lengths
concurrently with chunked prefill, and checks every token against transformers on the same
weights: its greedy decoding by uncached forwards (always) and its cached ``generate()``. The
second oracle has a known flaw: for some prompt lengths transformers' cached Mamba2 path departs
from its own uncached forward; those prompts are reported as such, not counted as ours. Prints a
short report; exits non-zero on a mismatch.

Any zoo model or checkpoint directory can take the embedded model's place (``autodeploy run
--model NAME_OR_DIR``), with the engine options of ``config``.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any

import torch

from autodeploy.api import LLM
from autodeploy.models import ZOO, build_model
from autodeploy.models.reference import greedy_generate, greedy_uncached
from autodeploy.runtime.sampling import SamplingParams

DEFAULT_MODEL = "hybrid"
DEMO_CONFIG = {"max_batch_size": 4, "max_seq_len": 256, "max_num_tokens": 48, "page_size": 16}
PROMPT_LENS = (3, 17, 40, 90, 130, 8)


def load_model(model: Any) -> tuple[Any, str]:
    """(what ``LLM`` takes, a display name) for a zoo name, a checkpoint directory or a model."""
    if isinstance(model, torch.nn.Module):
        return model, type(model).__name__
    path = os.fspath(model)
    if os.path.isdir(path) or (path.lower().endswith(".gguf") and os.path.isfile(path)):
        return path, os.path.basename(os.path.normpath(path)) or path
    if path in ZOO:
        return build_model(path), path
    if os.sep in path or path.startswith("."):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    raise FileNotFoundError(f"model {path!r} is neither a zoo model ({', '.join(ZOO)}) nor a checkpoint directory")


def run_demo(model: Any = DEFAULT_MODEL, prompt_lens=PROMPT_LENS, new_tokens: int = 24,
             config: dict | None = None) -> bool:
    """Serve random prompts of ``prompt_lens`` tokens on ``model`` (zoo name, checkpoint directory
    or model instance) and check every token against transformers; ``config``: LLM options over
    ``DEMO_CONFIG``. Prints a report ending in "OK" or "FAILED"; returns whether all matched."""
    cfg = {**DEMO_CONFIG, **(config or {})}
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens must be a positive int, got {new_tokens!r}")
    room = cfg["max_seq_len"] - new_tokens
    if room < 1:
        raise ValueError(f"max_seq_len {cfg['max_seq_len']} leaves no room for a prompt before {new_tokens} new tokens")
    prompt_lens = sorted(set(min(n, room) for n in prompt_lens), key=list(prompt_lens).index)
    source, name = load_model(model)
    llm = LLM(source, **cfg)
    model = llm.model
    print(f"model: {name} ({type(model).__name__}), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {llm.config.dtype}, "
          f"{llm.config.device.upper() if llm.config.device == 'cpu' else llm.config.device}")
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
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
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
