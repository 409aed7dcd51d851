"""Engine defaults derived from the model and the device, so that ``LLM(model)`` is fast as it is.

On a GPU: the checkpoint's own dtype, CUDA graphs, the model's whole context length (capped by
what the cache budget holds for one sequence), batch and step sizes for throughput, and caches
sized from the memory left after the weights by ``gpu_memory_utilization`` (vLLM's name and
meaning: the fraction of the GPU's memory this engine may use in all). On the CPU: float32,
eager, and today's small sizes, so the embedded demo starts as fast as ever. Every value the user
gives wins; the functions here are pure (facts in, choices out) and unit-tested on the CPU.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch

CPU_SIZES = {"max_batch_size": 8, "max_num_tokens": 128}
GPU_SIZES = {"max_batch_size": 64, "max_num_tokens": 2048}
CPU_MAX_SEQ_LEN = 2048  # caches for 8 full-length sequences stay small in host memory
FALLBACK_CONTEXT = 2048  # a model whose config names no context length
ACTIVATION_SLACK = 512 * 2**20  # allocator fragmentation, library workspaces, CUDA graph pools


@dataclass(frozen=True)
class DeviceFacts:
    """What the defaults need to know about the device."""

    device: str
    name: str = "cpu"
    total_bytes: int = 0
    free_bytes: int = 0

    @classmethod
    def probe(cls, device: str) -> DeviceFacts:
        if not str(device).startswith("cuda"):
            return cls(str(device))
        dev = torch.device(device)
        gc.collect()  # engines dropped but not yet collected (reference cycles) still hold caches
        free, total = torch.cuda.mem_get_info(dev)
        # memory torch's allocator holds but no tensor uses is free for our caches too
        free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return cls(str(device), torch.cuda.get_device_name(dev), total, free)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


def default_device(cuda_available: bool) -> str:
    return "cuda" if cuda_available else "cpu"


def default_dtype(device: str, checkpoint_dtype: torch.dtype | None) -> str:
    """float32 on the CPU; on a GPU the checkpoint's dtype (bfloat16 for a float32 or unknown one:
    a GPU runs half-precision matmuls several times faster, and trained checkpoints are bf16)."""
    if not device.startswith("cuda"):
        return "float32"
    if checkpoint_dtype in (torch.bfloat16, torch.float16):
        return {torch.bfloat16: "bfloat16", torch.float16: "float16"}[checkpoint_dtype]
    return "bfloat16"


def default_compile_mode(device: str, attn_backend: str, ssm_backend: str) -> str:
    """CUDA graphs on a GPU (unless a host-syncing torch backend was asked for), eager on the CPU."""
    if device.startswith("cuda") and "torch" not in (attn_backend, ssm_backend):
        return "cudagraph"
    return "eager"


def checkpoint_dtype(model: Any) -> torch.dtype | None:
    """The dtype a model instance, checkpoint directory or GGUF file stores its weights in (None:
    not known, e.g. a quantized GGUF file)."""
    if isinstance(model, torch.nn.Module):
        param = next(iter(model.parameters()), None)
        return param.dtype if param is not None else None
    path = os.fspath(model)
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return None
    import json

    with open(config) as f:
        raw = json.load(f)
    name = raw.get("dtype") or raw.get("torch_dtype") or (raw.get("text_config") or {}).get("dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def context_length(config: Any) -> int:
    """The model's context length from its config (the text config of a multimodal one)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return FALLBACK_CONTEXT


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """Upper bound on the KV-cache bytes one token costs: every layer counted as full attention."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", 1) or 1
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 64) // heads
    layers = getattr(config, "num_hidden_layers", 1) or 1
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def activation_bytes(hidden_size: int, vocab_size: int, max_num_tokens: int, logit_rows: int) -> int:
    """Room kept free for one step's activations: hidden states of every token of a step (with
    MLP and attention intermediates, ~32 hidden widths in float32) and float32 logits for the rows
    that are sampled, plus slack."""
    return max_num_tokens * hidden_size * 32 * 4 + logit_rows * vocab_size * 4 + ACTIVATION_SLACK


def gpu_cache_budget(facts: DeviceFacts, utilization: float, activations: int) -> int:
    """Bytes for all caches: ``utilization`` of the GPU's memory, less what is already in use
    (the weights and anything else on the device) and the activation reserve."""
    used = facts.total_bytes - facts.free_bytes
    budget = int(utilization * facts.total_bytes) - used - activations
    if budget <= 0:
        raise ValueError(
            f"no GPU memory left for caches on {facts.name}: {used / 2**30:.1f} GiB of {facts.total_bytes / 2**30:.1f} "
            f"GiB in use after loading the weights, {activations / 2**30:.1f} GiB kept for activations, "
            f"gpu_memory_utilization={utilization}; raise gpu_memory_utilization, lower max_num_tokens, "
            "or pass num_pages / max_cache_bytes")
    return budget


def fitting_seq_len(context: int, budget_bytes: int | None, per_token: int, page_size: int) -> int:
    """The context length, capped by the tokens one sequence's caches can hold within the budget."""
    if budget_bytes is None:
        return context
    fits = budget_bytes // max(per_token, 1) // page_size * page_size
    if fits < 2:
        raise ValueError(f"the cache budget of {budget_bytes} bytes holds no sequence ({per_token} bytes per "
                         "token); give a larger max_cache_bytes / gpu_memory_utilization")
    return max(2, min(context, fits))


def choose(given: dict[str, Any], facts: DeviceFacts, config: Any, dtype_bytes: int, page_size: int,
           utilization: float, spec_tokens: int) -> dict[str, Any]:
    """Every size the user left unset (None in ``given``), from the model config and the device.

    ``given`` holds max_seq_len, max_batch_size, max_num_tokens, num_pages, max_cache_bytes.
    Returns the completed values (num_pages stays None: the pool then derives it from
    max_cache_bytes or max_batch_size full-length requests)."""
    out = dict(given)
    sizes = GPU_SIZES if facts.is_cuda else CPU_SIZES
    for name, value in sizes.items():
        if out.get(name) is None:
            out[name] = value
    if facts.is_cuda and out.get("num_pages") is None and out.get("max_cache_bytes") is None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        rows = out["max_batch_size"] * (1 + spec_tokens)
        reserve = activation_bytes(getattr(text, "hidden_size", 1024), getattr(text, "vocab_size", 32000),
                                   out["max_num_tokens"], rows)
        out["max_cache_bytes"] = gpu_cache_budget(facts, utilization, reserve)
    if out.get("max_seq_len") is None:
        context = context_length(config)
        if facts.is_cuda:
            out["max_seq_len"] = fitting_seq_len(context, out.get("max_cache_bytes"),
                                                 kv_bytes_per_token(config, dtype_bytes), page_size)
        else:
            out["max_seq_len"] = min(context, CPU_MAX_SEQ_LEN)
    return out
