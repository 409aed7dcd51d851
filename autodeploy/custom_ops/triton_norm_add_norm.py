"""Triton kernel for ``autodeploy::rms_norm_add_rms_norm``: one program per row normalises x,
rounds it to the first norm's dtype, adds the residual (the sum rounded to the stream's dtype and
stored), and normalises the sum; the casts of each norm as in ``triton_rms_norm``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autodeploy.custom_ops.triton_pdl import pdl_launch, pdl_wait

__all__ = ["triton_norm_add_norm"]


@triton.jit
def _norm(x, w_ptr, cols, ok, n_cols, eps, weight_offset, CAST_FIRST: tl.constexpr):
    """One RMSNorm of the row ``x`` (any float dtype) -> float32 values before the output cast."""
    xf = x.to(tl.float32)
    y = xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if CAST_FIRST:  # weight * y.to(x.dtype)
        return w * y.to(x.dtype).to(tl.float32)
    return y * (w + weight_offset)


@triton.jit
def _norm_add_norm_kernel(x_ptr, w1_ptr, res_ptr, w2_ptr, mid_ptr, sum_ptr, out_ptr, n_cols, eps1, offset1, eps2,
                          offset2, CAST_FIRST1: tl.constexpr, CAST_FIRST2: tl.constexpr, BLOCK: tl.constexpr,
                          PDL: tl.constexpr = False):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    offs = row * n_cols + cols
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    first = _norm(x, w1_ptr, cols, ok, n_cols, eps1, offset1, CAST_FIRST1).to(mid_ptr.dtype.element_ty)
    res = tl.load(res_ptr + offs, mask=ok, other=0.0)
    total = (first.to(tl.float32) + res.to(tl.float32)).to(sum_ptr.dtype.element_ty)
    tl.store(sum_ptr + offs, total, mask=ok)
    out = _norm(total, w2_ptr, cols, ok, n_cols, eps2, offset2, CAST_FIRST2)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


def triton_norm_add_norm(x, weight, eps, weight_offset, cast_first, out_dtype, residual, weight2, eps2,
                         weight_offset2, cast_first2, out_dtype2):
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    res2 = residual.reshape(-1, n).contiguous()
    mid = torch.empty(0, dtype=out_dtype, device=x.device)  # only its dtype is read: the first norm's output type
    total = torch.empty(x2.shape, dtype=torch.promote_types(out_dtype, residual.dtype), device=x.device)
    out = torch.empty(x2.shape, dtype=out_dtype2, device=x.device)
    if x2.shape[0]:
        _norm_add_norm_kernel[(x2.shape[0],)](x2, weight, res2, weight2, mid, total, out, n, eps, weight_offset, eps2,
                                              weight_offset2, CAST_FIRST1=cast_first, CAST_FIRST2=cast_first2,
                                              BLOCK=triton.next_power_of_2(n), **pdl_launch(x.device))
    return out.view(x.shape), total.view(x.shape)
