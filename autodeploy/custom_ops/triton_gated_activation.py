"""Triton kernel for ``autodeploy::gated_activation``: ``act(gate) * up`` (or ``act(gate)``) in one pass.

Rows are the leading dims flattened; gate and up are read through their row strides (column
slices of a fused gate/up GEMM output need no copy). Math in float32, one rounding at the store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autodeploy.custom_ops.gated_activation import ACTIVATIONS
from autodeploy.custom_ops.triton_pdl import pdl_launch, pdl_wait

__all__ = ["triton_gated_activation"]


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _gated_kernel(gate_ptr, up_ptr, out_ptr, n_cols, stride_g, stride_u, ACT: tl.constexpr, HAS_UP: tl.constexpr,
                  BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2**31 for big steps
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    g = tl.load(gate_ptr + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    if ACT == 0:  # silu
        a = g / (1.0 + tl.exp(-g))
    elif ACT == 1:  # exact gelu
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACT == 2:  # tanh approximation
        a = 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    else:  # squared relu
        a = tl.maximum(g, 0.0) * tl.maximum(g, 0.0)
    if HAS_UP:
        a = a * tl.load(up_ptr + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, a.to(out_ptr.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t as [rows, n] with unit column stride, without a copy where the layout allows."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, n)
    except RuntimeError:  # rows not evenly strided: copy
        return t.reshape(-1, n).contiguous()


def triton_gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {ACTIVATIONS}")
    n = gate.shape[-1]
    g2 = _rows(gate, n)
    u2 = _rows(up, n) if up is not None else g2
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, u2.dtype), device=gate.device)
    rows = g2.shape[0]
    block = min(1024, triton.next_power_of_2(n))
    if rows:
        _gated_kernel[(rows, triton.cdiv(n, block))](g2, u2, out, n, g2.stride(0), u2.stride(0),
                                                       ACT=ACTIVATIONS.index(activation), HAS_UP=up is not None,
                                                       BLOCK=block, **pdl_launch(gate.device))
    return out
