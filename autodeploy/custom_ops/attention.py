"""Canonical attention op: ``autodeploy::attention``.

Causal attention over one contiguous sequence per batch row, in the layout the model produced
(``[batch, seq, heads, head_dim]``), so no transpose or ``repeat_kv`` has to stay in the graph.
Everything that changes the math is an argument: GQA/MQA (by head ratio), scale, sliding window
(HF convention: query ``i`` sees keys ``i-W+1 .. i``), logit soft-cap ``tanh(s/c)*c``, attention
sinks (one learned logit per head added to the softmax denominator) and block-local ("chunked")
attention (chunk C: query ``i`` sees the keys of its own block ``C*(i//C) .. i``, Llama 4's local
layers). Transforms match this op;
cache insertion replaces it with a cached op of the same semantics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["attention", "attention_reference", "causal_mask", "CachedAttentionLayer"]


@dataclass(frozen=True)
class CachedAttentionLayer:
    """One attention layer as insert_cached_attention caches it: what a backend's host half may
    need to know (``autodeploy.backends.HostHalf.spec_for``)."""

    name: str  # the graph node's name, for error messages
    page_size: int
    pool_window: int  # 0: the full pool; W: rings of ``ring_pages`` pages per slot bounded by W
    ring_pages: int
    window: int  # the layer's sliding window (0: none)
    chunk: int  # the layer's attention chunk (0: none)
    scale: float
    soft_cap: float
    has_sinks: bool
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype


def causal_mask(sq: int, skv: int, sliding_window: int = 0, attention_chunk: int = 0,
                device: torch.device | str | None = None) -> torch.Tensor:
    """[sq, skv] bool, True where query i (at absolute position skv - sq + i) may attend to key j:
    j <= its position, within the last ``sliding_window`` keys (0: no window), inside its own block
    of ``attention_chunk`` positions (0: off)."""
    q_pos = torch.arange(skv - sq, skv, device=device)[:, None]
    k_pos = torch.arange(skv, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window > 0:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    if attention_chunk > 0:
        allowed = allowed & (k_pos // attention_chunk == q_pos // attention_chunk)
    return allowed


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    soft_cap: float = 0.0,
    sinks: torch.Tensor | None = None,
    attention_chunk: int = 0,
) -> torch.Tensor:
    """Torch reference, computed in float32 (float64 if the inputs are float64).

    q: [b, sq, hq, d]; k, v: [b, skv, hkv, d] with hq % hkv == 0 and sq <= skv. Queries are aligned
    to the end of the keys (query i sits at absolute position skv - sq + i).
    sliding_window: W > 0 limits each query to its last W keys (itself included); 0 = no window.
    soft_cap: c > 0 applies tanh(s / c) * c to the scaled logits; 0 = off.
    sinks: [hq] extra per-head logits that join the softmax denominator only.
    attention_chunk: C > 0 limits each query to the keys of its own block of C positions (block
    boundaries at multiples of C, counted from key 0); 0 = off.
    Returns [b, sq, hq, d] in q's dtype.
    """
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    group = hq // hkv
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(compute).view(b, sq, hkv, group, d)
    kf, vf = k.to(compute), v.to(compute)
    # scores: [b, hkv, group, sq, skv]
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qf, kf) * scale
    if soft_cap > 0:
        scores = torch.tanh(scores / soft_cap) * soft_cap
    allowed = causal_mask(sq, skv, sliding_window, attention_chunk, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink = sinks.to(compute).view(1, hkv, group, 1, 1).expand(b, hkv, group, sq, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, vf)
    return out.reshape(b, sq, hq, d).to(q.dtype)


@torch.library.custom_op("autodeploy::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    soft_cap: float = 0.0,
    sinks: torch.Tensor | None = None,
    attention_chunk: int = 0,
) -> torch.Tensor:
    """Causal attention; see :func:`attention_reference` for shapes and semantics."""
    return attention_reference(q, k, v, scale, sliding_window, soft_cap, sinks, attention_chunk)


@attention.register_fake
def _attention_fake(q, k, v, scale, sliding_window=0, soft_cap=0.0, sinks=None, attention_chunk=0):
    return q.new_empty(q.shape)  # the real op returns a contiguous tensor
