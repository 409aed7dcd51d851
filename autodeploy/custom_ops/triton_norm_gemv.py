"""Triton kernel for ``autodeploy::rms_norm_linear`` / ``fused_add_rms_norm_linear`` at one row.

Every program first takes the whole row (x, plus the residual: their sum rounded to the stream's
dtype, as ``fused_add_rms_norm`` does; program 0 stores it) and its reciprocal RMS in float32,
then streams BLOCK_N weight rows over K in BLOCK_K steps as ``triton_gemv`` does, normalising each
K step of the row on the fly (the norm's casts as in ``triton_rms_norm``: the normalised row is
rounded to the row's dtype before the product). The row is at most a few KB and stays in L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autodeploy.custom_ops.triton_gemv import gemv_config
from autodeploy.custom_ops.triton_pdl import pdl_launch, pdl_wait

__all__ = ["triton_norm_gemv"]


@triton.jit
def _norm_gemv_kernel(x_ptr, res_ptr, sum_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_wn, eps, weight_offset,
                      HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, CAST_FIRST: tl.constexpr,
                      K_POW2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    # the first K step of the weights does not depend on earlier kernels (see triton_gemv)
    w_first = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & (rk < K)[None, :], other=0.0)
    pdl_wait(PDL)
    ka = tl.arange(0, K_POW2)
    row = tl.load(x_ptr + ka, mask=ka < K, other=0.0)
    if HAS_RESIDUAL:
        row = (row.to(tl.float32)
               + tl.load(res_ptr + ka, mask=ka < K, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
        if tl.program_id(0) == 0:
            tl.store(sum_ptr + ka, row, mask=ka < K)
    rowf = row.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(rowf * rowf, axis=0) / K + eps)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        xk = tl.load(x_ptr + kk, mask=k_ok, other=0.0)
        if HAS_RESIDUAL:
            xk = (xk.to(tl.float32)
                  + tl.load(res_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
        y = xk.to(tl.float32) * rstd
        nw = tl.load(nw_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
        if CAST_FIRST:  # weight * y.to(x.dtype)
            h = nw * y.to(x_ptr.dtype.element_ty).to(tl.float32)
        else:
            h = y * (nw + weight_offset)
        h = h.to(x_ptr.dtype.element_ty).to(tl.float32)  # the norm's output dtype, as the product sees it
        if k0 == 0:
            w = w_first
        else:
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * h[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rn, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def triton_norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                     weight_offset: float, cast_first: bool, weight: torch.Tensor, bias: torch.Tensor | None,
                     config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (and residual): [..., K] holding one row; weight [N, K] row-contiguous -> (out [..., N],
    x + residual [..., K] or None). The norm's output dtype is x's."""
    n, k = weight.shape
    if x.numel() != k:
        raise ValueError(f"triton_norm_gemv takes one row of {k} inputs, got shape {tuple(x.shape)}")
    x1 = x.reshape(k).contiguous()
    res1 = residual.reshape(k).contiguous() if residual is not None else x1
    total = torch.empty_like(x1) if residual is not None else None
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    cfg = dict(config or gemv_config(n, k))
    block_n, block_k = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    _norm_gemv_kernel[(triton.cdiv(n, block_n),)](
        x1, res1, total if total is not None else x1, norm_weight, weight, bias if bias is not None else weight, out,
        n, k, weight.stride(0), eps, weight_offset, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        CAST_FIRST=cast_first, K_POW2=triton.next_power_of_2(k), BLOCK_N=block_n, BLOCK_K=block_k,
        **pdl_launch(x.device), **cfg)
    return out.view(*x.shape[:-1], n), (total.view(x.shape) if total is not None else None)
