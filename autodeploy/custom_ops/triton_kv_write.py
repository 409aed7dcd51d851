"""One Triton launch that writes a step's K and V into their paged pools (two ``index_copy_``
kernels before; at batch 1 a sliding-window model spends a tenth of its step in them).

Token t's keys and values (``[hkv * d]`` each, read through the token stride, so the K/V slices of
a fused QKV projection need no copy) go to flat cache row ``write_idx[t]`` of both pools, cast to
the cache dtype. Rows come from ``prepare_attention_metadata``: in range by construction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autodeploy.custom_ops.triton_pdl import pdl_launch, pdl_wait

__all__ = ["triton_write_kv"]


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, write_idx_ptr, stride_kt, stride_kh, stride_vt,
                     stride_vh, heads, head_dim, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_wait(PDL)
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row_elems = heads * head_dim
    ok = offs < row_elems
    h, e = offs // head_dim, offs % head_dim
    dst = tl.load(write_idx_ptr + t).to(tl.int64) * row_elems + offs
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + e, mask=ok)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + e, mask=ok)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def triton_write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    write_idx: torch.Tensor) -> None:
    """k, v: [1, T, hkv, d] (any token and head strides, unit stride over d); caches [pages,
    page_size, hkv, d], contiguous; write_idx: [T] flat cache rows."""
    num_tokens, heads, head_dim = k.shape[1:]
    if not num_tokens:
        return
    k2, v2 = (x[0] if x.stride(-1) == 1 else x[0].contiguous() for x in (k, v))
    block = min(1024, triton.next_power_of_2(heads * head_dim))
    _write_kv_kernel[(num_tokens, triton.cdiv(heads * head_dim, block))](
        k2, v2, k_cache, v_cache, write_idx, k2.stride(0), k2.stride(1), v2.stride(0), v2.stride(1), heads, head_dim,
        BLOCK=block, **pdl_launch(k_cache.device))
