"""Triton kernels for ``autodeploy::rms_norm`` and ``autodeploy::fused_add_rms_norm``.

One program normalises one group of channels of one row (a group is the whole row unless the norm
is grouped, as in NemotronH's gated norm), in float32, and writes the result once. Inputs are made
row-contiguous first (a copy only for strided views such as Gemma3's per-head q/k norms).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autodeploy.custom_ops.triton_pdl import pdl_launch, pdl_wait

__all__ = ["triton_rms_norm", "triton_fused_add_rms_norm"]


@triton.jit
def _rms_norm_kernel(
    x_ptr, gate_ptr, res_ptr, sum_ptr, w_ptr, out_ptr, n_cols, groups, eps, weight_offset,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    CAST_FIRST: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    row = (tl.program_id(0) // groups).to(tl.int64)  # row * n_cols passes 2**31 for big steps
    cols = (tl.program_id(0) % groups) * GROUP + tl.arange(0, BLOCK)
    ok = cols < ((tl.program_id(0) % groups) * GROUP + GROUP)
    offs = row * n_cols + cols
    x_raw = tl.load(x_ptr + offs, mask=ok, other=0.0)
    if HAS_RESIDUAL:  # the sum is rounded to the stream's dtype before it is normalised, as in eager
        total = (x_raw.to(tl.float32) + tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32))
        x_raw = total.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + offs, x_raw, mask=ok)
    x = x_raw.to(tl.float32)
    if HAS_GATE:
        g = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        x = x * (g / (1.0 + tl.exp(-g)))
    y = x * tl.rsqrt(tl.sum(x * x, axis=0) / GROUP + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if CAST_FIRST:  # weight * y.to(x.dtype)
        out = w * y.to(x_raw.dtype).to(tl.float32)
    else:
        out = y * (w + weight_offset)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


def _launch(x, weight, gate, residual, eps, group_size, weight_offset, cast_first, out_dtype):
    n = x.shape[-1]
    group = group_size or n
    if n % group:
        raise ValueError(f"rms_norm: {n} channels do not split into groups of {group}")
    x2 = x.reshape(-1, n).contiguous()
    gate2 = gate.reshape(-1, n).contiguous() if gate is not None else x2
    res2 = residual.reshape(-1, n).contiguous() if residual is not None else x2
    total = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device) \
        if residual is not None else x2
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    groups = n // group
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0] * groups,)](
            x2, gate2, res2, total, weight, out, n, groups, eps, weight_offset,
            GROUP=group, BLOCK=triton.next_power_of_2(group), HAS_GATE=gate is not None,
            HAS_RESIDUAL=residual is not None, CAST_FIRST=cast_first, **pdl_launch(x.device),
        )
    return out.view(x.shape), total.view(x.shape)


def triton_rms_norm(x, weight, gate, eps, group_size, weight_offset, cast_first, out_dtype):
    return _launch(x, weight, gate, None, eps, group_size, weight_offset, cast_first, out_dtype)[0]


def triton_fused_add_rms_norm(x, residual, weight, eps, weight_offset, cast_first, out_dtype):
    return _launch(x, weight, None, residual, eps, 0, weight_offset, cast_first, out_dtype)
