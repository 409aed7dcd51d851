"""Cached attention, torch backend (the oracle): ``autodeploy::torch_cached_attention``.

Writes the step's K/V into the paged pool at ``write_idx`` and attends each lane's queries over
its keys ``kv_start .. kv_len-1`` gathered through ``page_list`` (all from the prepare node).
Loops over lanes on the host. A lane of several tokens runs ``attention_reference`` (causal mask,
einsum, softmax); a lane of one token (a decode step) gathers only the keys its query sees and
runs one ``scaled_dot_product_attention`` (or, with a soft cap or sinks, matmul, softmax, matmul)
without building a mask: the same math, in the same float32 (float64) compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
        n_new = cu[lane + 1] - cu[lane]
        if n_new == 0:
            continue
        start, end = starts[lane], ends[lane]
        if n_new == 1:  # the query sits at end - 1: it sees its window / block only
            if sliding_window > 0:
                start = max(start, end - sliding_window)
            if attention_chunk > 0:
                start = max(start, (end - 1) // attention_chunk * attention_chunk)
        first = start // page_size * page_size
        skip = first // page_size - starts[lane] // page_size  # page_list[lane] starts at kv_start's page
        pages = page_list[lane, skip:skip + -(-(end - first) // page_size)]
        keys = k_cache.index_select(0, pages).view(-1, hkv, d)[start - first: end - first]
        values = v_cache.index_select(0, pages).view(-1, hkv, d)[start - first: end - first]
        if n_new == 1:
            out[0, cu[lane]] = _decode_attention(q[0, cu[lane]], keys, values, scale, soft_cap, sinks)
        else:
            out[:, cu[lane]:cu[lane + 1]] = attention_reference(
                q[:, cu[lane]:cu[lane + 1]], keys[None].to(q.dtype), values[None].to(q.dtype),
                scale, sliding_window, soft_cap, sinks, attention_chunk,
            )
    return out


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, soft_cap: float,
                      sinks: torch.Tensor | None) -> torch.Tensor:
    """One query token over keys it all may see: q [hq, d]; keys, values [L, hkv, d] -> [hq, d] in
    q's dtype, computed in float32 (float64 for float64 inputs) like ``attention_reference``."""
    hq, d = q.shape
    hkv = keys.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(compute).view(hkv, hq // hkv, d)
    kf, vf = keys.to(compute).transpose(0, 1), values.to(compute).transpose(0, 1)  # [hkv, L, d]
    if soft_cap <= 0 and sinks is None:
        out = F.scaled_dot_product_attention(qf, kf, vf, scale=scale)  # [hkv, group, d]
    else:
        scores = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [hkv, group, L]
        if soft_cap > 0:
            scores = torch.tanh(scores / soft_cap) * soft_cap
        if sinks is not None:
            sink = sinks.to(compute).view(hkv, hq // hkv, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, vf)
    return out.reshape(hq, d).to(q.dtype)


@torch_cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, write_idx, kv_start, kv_len, page_list, cu_seqlens, scale,
      sliding_window, soft_cap, sinks, attention_chunk=0):
    return torch.empty_like(q)
