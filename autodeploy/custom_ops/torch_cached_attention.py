"""Cached attention, torch backend (the oracle): ``autodeploy::torch_cached_attention``.

Writes the step's K/V into the paged pool at ``write_idx`` and attends each lane's queries over
its keys ``kv_start .. kv_len-1`` gathered through ``page_list`` (all from the prepare node).
Loops over lanes on the host: it is the reference, not the fast path.
"""

from __future__ import annotations

import torch

from autodeploy.custom_ops.attention import attention_reference

__all__ = ["torch_cached_attention"]


@torch.library.custom_op("autodeploy::torch_cached_attention", mutates_args=("k_cache", "v_cache"))
def torch_cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_idx: torch.Tensor,
    kv_start: torch.Tensor,
    kv_len: torch.Tensor,
    page_list: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    sliding_window: int,
    soft_cap: float,
    sinks: torch.Tensor | None,
    attention_chunk: int = 0,
) -> torch.Tensor:
    """q: [1, T, hq, d]; k, v: [1, T, hkv, d]; k_cache, v_cache: [pages, page_size, hkv, d].

    Returns [1, T, hq, d]. Metadata shapes: see ``prepare_attention_metadata``. With
    ``attention_chunk`` C, ``kv_start`` is a multiple of C (the prepare node makes it one), so the
    block boundaries of the gathered keys are the sequence's.
    """
    page_size, hkv, d = k_cache.shape[1:]
    k_cache.view(-1, hkv, d).index_copy_(0, write_idx, k[0].to(k_cache.dtype))
    v_cache.view(-1, hkv, d).index_copy_(0, write_idx, v[0].to(v_cache.dtype))
    out = torch.empty_like(q)
    cu, starts, ends = cu_seqlens.tolist(), kv_start.tolist(), kv_len.tolist()
    for lane in range(len(starts)):
        if cu[lane + 1] == cu[lane]:
            continue
        first = starts[lane] // page_size * page_size
        n_pages = -(-(ends[lane] - first) // page_size)
        pages = page_list[lane, :n_pages]
        keys = k_cache[pages].reshape(-1, hkv, d)[starts[lane] - first: ends[lane] - first]
        values = v_cache[pages].reshape(-1, hkv, d)[starts[lane] - first: ends[lane] - first]
        out[:, cu[lane]:cu[lane + 1]] = attention_reference(
            q[:, cu[lane]:cu[lane + 1]], keys[None].to(q.dtype), values[None].to(q.dtype),
            scale, sliding_window, soft_cap, sinks, attention_chunk,
        )
    return out


@torch_cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, write_idx, kv_start, kv_len, page_list, cu_seqlens, scale,
      sliding_window, soft_cap, sinks, attention_chunk=0):
    return torch.empty_like(q)
