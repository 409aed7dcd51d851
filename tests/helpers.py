"""Shared helpers for tests: zoo facts and logits comparisons."""

from __future__ import annotations

import collections

import torch

from autodeploy.export import ssm_mixers
from autodeploy.models.reference import greedy_generate, greedy_uncached

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton op tests run on CUDA when there is one
ATTENTION = torch.ops.autodeploy.attention.default
SSD_SCAN = torch.ops.autodeploy.ssd_scan.default
CAUSAL_CONV1D = torch.ops.autodeploy.causal_conv1d.default
LEFTOVER_ATTENTION = {torch.ops.aten.scaled_dot_product_attention.default, torch.ops.aten.softmax.int,
                      torch.ops.aten._softmax.default}


def op_counts(gm) -> collections.Counter:
    return collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def attention_layers(model) -> int:
    """Attention modules by class name (LlamaAttention, NemotronHAttention, ...)."""
    return sum(type(m).__name__.endswith("Attention") for m in model.modules())


def mamba_layers(model) -> int:
    return len(ssm_mixers(model))


def expected_windows(model) -> list[int]:
    """Per attention layer, the sliding window transformers applies (0 = full), from the config."""
    cfg = model.config
    layer_types = getattr(cfg, "layer_types", None)
    windows = []
    for i, m in enumerate(m for m in model.modules() if type(m).__name__.endswith("Attention")):
        layer = getattr(m, "layer_idx", i)
        if type(model).__name__.startswith("Mistral"):
            windows.append(cfg.sliding_window or 0)
        elif layer_types is not None and layer_types[layer] == "sliding_attention":
            windows.append(cfg.sliding_window)
        else:
            windows.append(0)
    return windows


def hf_logits(model, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=g)
    pos = torch.arange(length)[None]
    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    return ids, pos, ref


hf_greedy_uncached = greedy_uncached  # the transformers module's own uncached forwards
hf_generate = greedy_generate  # transformers' cached generate()
