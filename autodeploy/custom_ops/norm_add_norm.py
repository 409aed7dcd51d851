"""``autodeploy::rms_norm_add_rms_norm``: an RMSNorm whose output is added to the residual stream
and normalised again, as one op: (norm2(norm1(x) + residual), norm1(x) + residual).

Gemma-style "sandwich" layers normalise each block's output (post-attention / post-feedforward
norm) before the residual add that the next norm reads; ``fused_add_rms_norm`` already covers add
+ norm, this also takes the first norm, so the pair is one launch per row on CUDA
(``triton_norm_add_norm.py``) at every batch size. The torch path is the two ops it replaces.
"""

from __future__ import annotations

import torch

from autodeploy.custom_ops.rms_norm import fused_add_rms_norm_body, rms_norm_body

__all__ = ["rms_norm_add_rms_norm"]


@torch.library.custom_op("autodeploy::rms_norm_add_rms_norm", mutates_args=())
def rms_norm_add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float, cast_first: bool,
                          out_dtype: torch.dtype, residual: torch.Tensor, weight2: torch.Tensor, eps2: float,
                          weight_offset2: float, cast_first2: bool,
                          out_dtype2: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_add_rms_norm(rms_norm(x, weight, None, eps, 0, weight_offset, cast_first, out_dtype),
    residual, weight2, eps2, weight_offset2, cast_first2, out_dtype2)."""
    if x.is_cuda:
        from autodeploy.custom_ops.triton_norm_add_norm import triton_norm_add_norm

        return triton_norm_add_norm(x, weight, eps, weight_offset, cast_first, out_dtype, residual, weight2, eps2,
                                    weight_offset2, cast_first2, out_dtype2)
    first = rms_norm_body(x, weight, None, eps, 0, weight_offset, cast_first, out_dtype)
    return fused_add_rms_norm_body(first, residual, weight2, eps2, weight_offset2, cast_first2, out_dtype2)


@rms_norm_add_rms_norm.register_fake
def _(x, weight, eps, weight_offset, cast_first, out_dtype, residual, weight2, eps2, weight_offset2, cast_first2,
      out_dtype2):
    total = torch.empty_like(x.new_empty(x.shape, dtype=out_dtype) + residual)
    return total.new_empty(total.shape, dtype=out_dtype2), total
