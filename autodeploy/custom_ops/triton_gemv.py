"""Triton GEMV for ``autodeploy::linear`` at one row: out[n] = sum_k x[k] * w[n, k] (+ bias[n]).

A one-row product reads every weight once and does 2 FLOP per weight element: pure bandwidth.
Each program owns BLOCK_N output features and streams their weight rows over K in long BLOCK_K
steps (wide loads, many bytes in flight per SM); narrow N blocks give enough programs to cover
the SMs even for a 2048-row weight. Elementwise multiply and a float32 reduction (no MMA tile to
fill), one rounding at the end. Tiles: ``gemv_config``, from a sweep on an H200
(benchmarks/bench_gemv.py): 1.1-1.3x faster than cuBLAS at one row on every bench-model shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autodeploy.custom_ops.triton_pdl import pdl_launch, pdl_wait

__all__ = ["triton_gemv", "gemv_config"]


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_wn,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 PDL: tl.constexpr = False):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    # the first K step of the weights reads nothing an earlier kernel writes: under programmatic
    # dependent launch (triton_pdl) it is loaded while the previous kernel finishes; x waits
    w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & (rk < K)[None, :], other=0.0)
    pdl_wait(PDL)
    x = tl.load(x_ptr + rk, mask=rk < K, other=0.0)
    acc = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + rk
        if EVEN_K:
            x = tl.load(x_ptr + kk)
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None], other=0.0)
        else:
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & (kk < K)[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rn, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def gemv_config(n: int, k: int) -> dict:
    """Tile sizes for a [n, k] weight: 1024-wide K steps over 8 warps, 4 or 8 rows per program (the
    sweep's best on an H200 for n from 2048 to 32000 at k = 2048..6144)."""
    return {"BLOCK_N": 4 if n <= 6144 else 8, "BLOCK_K": min(1024, triton.next_power_of_2(k)),
            "num_warps": 8, "num_stages": 3}


def triton_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: dict | None = None) -> torch.Tensor:
    """x [..., K] holding one row, weight [N, K] row-contiguous, bias [N] -> [..., N]."""
    n, k = weight.shape
    if x.numel() != k:
        raise ValueError(f"triton_gemv takes one row of {k} inputs, got shape {tuple(x.shape)}")
    x1 = x.reshape(k)
    if x1.stride(0) != 1:
        x1 = x1.contiguous()
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    cfg = dict(config or gemv_config(n, k))
    block_n, block_k = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x1, weight, bias if bias is not None else weight, out, n, k, weight.stride(0), HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, **pdl_launch(x.device), **cfg)
    return out.view(*x.shape[:-1], n)
