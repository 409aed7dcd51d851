"""``autodeploy::rms_norm_rope``: per-head RMSNorm of q and k followed by rotary embedding, one op.

Gemma 3 (and Qwen 3, OLMo 2-style q/k norms) normalise every query and key head before RoPE: two
norm launches and the rotary launch per attention layer become one Triton launch on CUDA
(``triton_norm_rope.py``). The torch path is the ops it replaces: ``rms_norm`` of q and of k (each
with its own weight), then ``rope``.
"""

from __future__ import annotations

import torch

from autodeploy.custom_ops.rms_norm import rms_norm_body
from autodeploy.custom_ops.rope import rope_body

__all__ = ["rms_norm_rope"]


@torch.library.custom_op("autodeploy::rms_norm_rope", mutates_args=())
def rms_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                  weight_offset: float, cast_first: bool, position_ids: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, token_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rope(rms_norm(q, q_weight, ...), rms_norm(k, k_weight, ...), position_ids, cos, sin, token_dim);
    each norm over head_dim, in q's / k's own dtype."""
    if q.is_cuda and q.stride(-1) == 1 and k.stride(-1) == 1:
        from autodeploy.custom_ops.triton_norm_rope import triton_norm_rope

        return triton_norm_rope(q, k, q_weight, k_weight, eps, weight_offset, cast_first, position_ids, cos, sin,
                                token_dim)
    qn = rms_norm_body(q, q_weight, None, eps, 0, weight_offset, cast_first, q.dtype)
    kn = rms_norm_body(k, k_weight, None, eps, 0, weight_offset, cast_first, k.dtype)
    return rope_body(qn, kn, position_ids, cos, sin, token_dim)


@rms_norm_rope.register_fake
def _(q, k, q_weight, k_weight, eps, weight_offset, cast_first, position_ids, cos, sin, token_dim):
    return q.new_empty(q.shape), k.new_empty(k.shape)  # contiguous on every path
