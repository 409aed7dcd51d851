"""Triton kernel for ``autodeploy::rope``: q and k of a step rotated in one launch.

One program per (token, head) over the query heads then the key heads; it gathers the token's
cos/sin row by position and rotates the leading ``rotary_dim`` channels (neox layout: halves),
copying the rest. Float32 math, one rounding at the store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autodeploy.custom_ops.triton_pdl import pdl_launch, pdl_wait

__all__ = ["triton_rope"]


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cos_ptr, sin_ptr, hq,
                 sq_t, sq_h, sk_t, sk_h, so_qt, so_qh, so_kt, so_kh,
                 HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                 PDL: tl.constexpr = False):
    pdl_wait(PDL)
    token, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    is_q = head < hq
    if is_q:
        src = q_ptr + token * sq_t + head * sq_h
        dst = qo_ptr + token * so_qt + head * so_qh
    else:
        src = k_ptr + token * sk_t + (head - hq) * sk_h
        dst = ko_ptr + token * so_kt + (head - hq) * so_kh
    pos = tl.load(pos_ptr + token).to(tl.int64)
    i = tl.arange(0, BLOCK_H)
    ok = i < HALF
    c1 = tl.load(cos_ptr + pos * 2 * HALF + i, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * 2 * HALF + HALF + i, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * 2 * HALF + i, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * 2 * HALF + HALF + i, mask=ok, other=0.0).to(tl.float32)
    x1 = tl.load(src + i, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + i, mask=ok, other=0.0).to(tl.float32)
    out_ty = dst.dtype.element_ty
    tl.store(dst + i, (x1 * c1 - x2 * s1).to(out_ty), mask=ok)
    tl.store(dst + HALF + i, (x2 * c2 + x1 * s2).to(out_ty), mask=ok)
    if HEAD_DIM > 2 * HALF:  # partial rotary: the tail passes through
        j = 2 * HALF + tl.arange(0, BLOCK_D)
        keep = j < HEAD_DIM
        tl.store(dst + j, tl.load(src + j, mask=keep, other=0.0), mask=keep)


def triton_rope(q, k, position_ids, cos, sin, token_dim):
    if q.dim() != 4 or token_dim not in (1, 2) or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"rope: expected [1, heads, T, d] or [1, T, heads, d] with unit last stride, "
                         f"got q {tuple(q.shape)} token_dim {token_dim}")
    head_dim_axis = 3 - token_dim
    rd = cos.shape[-1]
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    T, hq, hk = q.shape[token_dim], q.shape[head_dim_axis], k.shape[head_dim_axis]
    if T:
        _rope_kernel[(T, hq + hk)](
            q, k, qo, ko, position_ids.reshape(-1), cos.contiguous(), sin.contiguous(), hq,
            q.stride(token_dim), q.stride(head_dim_axis), k.stride(token_dim), k.stride(head_dim_axis),
            qo.stride(token_dim), qo.stride(head_dim_axis), ko.stride(token_dim), ko.stride(head_dim_axis),
            HEAD_DIM=q.shape[-1], HALF=rd // 2, BLOCK_H=triton.next_power_of_2(rd // 2),
            BLOCK_D=triton.next_power_of_2(max(q.shape[-1] - rd, 1)), **pdl_launch(q.device),
        )
    return qo, ko
