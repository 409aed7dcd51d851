"""RMSNorm followed by a linear layer as one op: ``autodeploy::rms_norm_linear`` and
``autodeploy::fused_add_rms_norm_linear`` (which also returns the residual sum).

Every decoder layer normalises its hidden state and feeds it to one projection (fused QKV, the
MLP's gate/up, a Mamba2 in_proj). At one row on CUDA (bfloat16/float16) the pair runs as one
Triton launch (``triton_norm_gemv.py``): each GEMV program normalises the row itself (4-16 KB
read from L2) before streaming its weight rows, so the normalised row never round-trips through
memory and the norm's launch is gone. Otherwise (the CPU, several rows, float32) the op is the
two ops it replaces, in the same order of casts (``rms_norm`` then ``linear``).
"""

from __future__ import annotations

import torch

from autodeploy.custom_ops.linear import _use_gemv, linear_body
from autodeploy.custom_ops.rms_norm import fused_add_rms_norm_body, rms_norm_body

__all__ = ["rms_norm_linear", "fused_add_rms_norm_linear"]


@torch.library.custom_op("autodeploy::rms_norm_linear", mutates_args=())
def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight_offset: float, cast_first: bool,
                    norm_dtype: torch.dtype, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``linear(rms_norm(x, norm_weight, None, eps, 0, weight_offset, cast_first, norm_dtype), weight, bias)``."""
    if _use_gemv(x, weight) and norm_dtype == x.dtype:
        from autodeploy.custom_ops.triton_norm_gemv import triton_norm_gemv

        return triton_norm_gemv(x, None, norm_weight, eps, weight_offset, cast_first, weight, bias)[0]
    return linear_body(rms_norm_body(x, norm_weight, None, eps, 0, weight_offset, cast_first, norm_dtype), weight, bias)


@rms_norm_linear.register_fake
def _(x, norm_weight, eps, weight_offset, cast_first, norm_dtype, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=norm_dtype)


@torch.library.custom_op("autodeploy::fused_add_rms_norm_linear", mutates_args=())
def fused_add_rms_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                              weight_offset: float, cast_first: bool, norm_dtype: torch.dtype, weight: torch.Tensor,
                              bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(normed), x + residual) for (normed, x + residual) = fused_add_rms_norm(x, residual, ...)."""
    if _use_gemv(x, weight) and norm_dtype == x.dtype == residual.dtype:
        from autodeploy.custom_ops.triton_norm_gemv import triton_norm_gemv

        return triton_norm_gemv(x, residual, norm_weight, eps, weight_offset, cast_first, weight, bias)
    normed, total = fused_add_rms_norm_body(x, residual, norm_weight, eps, weight_offset, cast_first, norm_dtype)
    return linear_body(normed, weight, bias), total


@fused_add_rms_norm_linear.register_fake
def _(x, residual, norm_weight, eps, weight_offset, cast_first, norm_dtype, weight, bias):
    total = torch.empty_like(x + residual)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=norm_dtype), total
