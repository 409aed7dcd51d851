"""RMSNorm as one op: ``autodeploy::rms_norm`` (and the residual-add variant).

One op covers the RMSNorm flavours transformers writes out as eight or more small ops:

* Llama/Mistral: ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` (``cast_first``),
* Gemma: ``(y * (1 + weight.float())).type_as(x)`` (``weight_offset = 1``),
* NemotronH: ``(weight.float() * y).to(x.dtype)``,
* Mamba2's gated norm: ``x * silu(gate)`` first, optionally normalised per group of channels.

The torch implementation repeats transformers' order of casts exactly (the oracle); on CUDA the op
runs one Triton kernel per call (float32 inside, one rounding at the end). Outputs are contiguous
whatever the input's strides (Gemma 3 normalises transposed per-head q/k views), on every path and
in the fake implementation, so compiled graphs see the layout they were traced with.
``autodeploy::fused_add_rms_norm`` adds a residual first and returns (normed, sum): one pass over
the hidden state instead of two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["rms_norm", "rms_norm_reference", "fused_add_rms_norm", "rms_norm_body", "fused_add_rms_norm_body"]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, eps: float,
                       group_size: int, weight_offset: float, cast_first: bool,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """The eager computation, in transformers' order of casts."""
    xf = x.float()
    if gate is not None:
        xf = xf * F.silu(gate.float())
    shape = xf.shape
    if group_size:
        xf = xf.view(*shape[:-1], -1, group_size)
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).view(shape)
    if cast_first:
        out = weight * y.to(x.dtype)
    else:
        out = y * (weight.float() + weight_offset) if weight_offset else weight.float() * y
    return out.to(out_dtype)


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float, cast_first: bool,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """:func:`rms_norm_reference` without gate or groups, the normalisation as one ``torch.rms_norm``
    call (the same float32 arithmetic as ``x * rsqrt(mean(x^2) + eps)``, in fewer launches)."""
    y = torch.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    if cast_first:
        out = weight * y.to(x.dtype)
    else:
        out = y * (weight.float() + weight_offset) if weight_offset else weight.float() * y
    return out.to(out_dtype)


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda


def rms_norm_body(x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, eps: float, group_size: int,
                  weight_offset: float, cast_first: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """What ``autodeploy::rms_norm`` runs; fused ops call it as a plain function (no dispatch)."""
    if _use_triton(x):
        from autodeploy.custom_ops.triton_rms_norm import triton_rms_norm

        return triton_rms_norm(x, weight, gate, eps, group_size, weight_offset, cast_first, out_dtype)
    if gate is None and not group_size:
        return _rms_norm_torch(x, weight, eps, weight_offset, cast_first, out_dtype).contiguous()
    return rms_norm_reference(x, weight, gate, eps, group_size, weight_offset, cast_first, out_dtype).contiguous()


@torch.library.custom_op("autodeploy::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, eps: float, group_size: int,
             weight_offset: float, cast_first: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm over the last dim (or groups of ``group_size`` channels of it), optionally gated by
    ``silu(gate)``; see :func:`rms_norm_reference` for the exact semantics."""
    return rms_norm_body(x, weight, gate, eps, group_size, weight_offset, cast_first, out_dtype)


@rms_norm.register_fake
def _(x, weight, gate, eps, group_size, weight_offset, cast_first, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def fused_add_rms_norm_body(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            weight_offset: float, cast_first: bool,
                            out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``autodeploy::fused_add_rms_norm`` runs; fused ops call it as a plain function."""
    if _use_triton(x):
        from autodeploy.custom_ops.triton_rms_norm import triton_fused_add_rms_norm

        return triton_fused_add_rms_norm(x, residual, weight, eps, weight_offset, cast_first, out_dtype)
    total = (x + residual).contiguous()
    return _rms_norm_torch(total, weight, eps, weight_offset, cast_first, out_dtype).contiguous(), total


@torch.library.custom_op("autodeploy::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       weight_offset: float, cast_first: bool,
                       out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual stream's add and the next norm."""
    return fused_add_rms_norm_body(x, residual, weight, eps, weight_offset, cast_first, out_dtype)


@fused_add_rms_norm.register_fake
def _(x, residual, weight, eps, weight_offset, cast_first, out_dtype):
    total = (x + residual).contiguous()
    return total.new_empty(total.shape, dtype=out_dtype), total
