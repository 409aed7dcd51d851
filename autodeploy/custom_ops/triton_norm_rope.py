"""Triton kernel for ``autodeploy::rms_norm_rope``: one program per (token, head) over the query
heads then the key heads, as ``triton_rope``; it loads the whole head, normalises it in float32
(the norm's casts as in ``triton_rms_norm``, rounded to the head's dtype as the separate op's
output is), then rotates the leading rotary channels (neox halves) and copies the rest."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autodeploy.custom_ops.triton_pdl import pdl_launch, pdl_wait

__all__ = ["triton_norm_rope"]


@triton.jit
def _norm_rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, pos_ptr, cos_ptr, sin_ptr, hq, eps, weight_offset,
                      sq_t, sq_h, sk_t, sk_h, so_qt, so_qh, so_kt, so_kh,
                      HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr, CAST_FIRST: tl.constexpr,
                      PDL: tl.constexpr = False):
    pdl_wait(PDL)
    token, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    if head < hq:
        src = q_ptr + token * sq_t + head * sq_h
        dst = qo_ptr + token * so_qt + head * so_qh
        w_ptr = qw_ptr
    else:
        src = k_ptr + token * sk_t + (head - hq) * sk_h
        dst = ko_ptr + token * so_kt + (head - hq) * so_kh
        w_ptr = kw_ptr
    d = tl.arange(0, BLOCK)
    ok = d < HEAD_DIM
    x_raw = tl.load(src + d, mask=ok, other=0.0)
    x = x_raw.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / HEAD_DIM + eps)
    y = x * rstd
    w = tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32)
    if CAST_FIRST:  # weight * y.to(x.dtype)
        h = w * y.to(x_raw.dtype).to(tl.float32)
    else:
        h = y * (w + weight_offset)
    h = h.to(x_raw.dtype).to(tl.float32)  # the norm's output, as rope reads it
    # rotate_half: channel i < HALF pairs with i + HALF; the tail past 2 * HALF passes through
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    rot = (d < 2 * HALF) & ok
    pos = tl.load(pos_ptr + token).to(tl.int64)
    c = tl.load(cos_ptr + pos * 2 * HALF + d, mask=rot, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + pos * 2 * HALF + d, mask=rot, other=0.0).to(tl.float32)
    # the partner's normalised value: recompute it from its own element (no cross-lane shuffle)
    xp_raw = tl.load(src + partner, mask=rot, other=0.0)
    yp = xp_raw.to(tl.float32) * rstd
    wp = tl.load(w_ptr + partner, mask=rot, other=0.0).to(tl.float32)
    if CAST_FIRST:
        hp = wp * yp.to(x_raw.dtype).to(tl.float32)
    else:
        hp = yp * (wp + weight_offset)
    hp = hp.to(x_raw.dtype).to(tl.float32)
    sign = tl.where(d < HALF, -1.0, 1.0)
    out = tl.where(rot, h * c + sign * hp * s, h)
    tl.store(dst + d, out.to(dst.dtype.element_ty), mask=ok)


def triton_norm_rope(q, k, q_weight, k_weight, eps, weight_offset, cast_first, position_ids, cos, sin, token_dim):
    if q.dim() != 4 or token_dim not in (1, 2) or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"rms_norm_rope: expected [1, heads, T, d] or [1, T, heads, d] with unit last stride, "
                         f"got q {tuple(q.shape)} token_dim {token_dim}")
    head_axis = 3 - token_dim
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, as the norms' outputs were
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    T, hq, hk = q.shape[token_dim], q.shape[head_axis], k.shape[head_axis]
    if T:
        _norm_rope_kernel[(T, hq + hk)](
            q, k, qo, ko, q_weight, k_weight, position_ids.reshape(-1), cos.contiguous(), sin.contiguous(), hq, eps,
            weight_offset, q.stride(token_dim), q.stride(head_axis), k.stride(token_dim), k.stride(head_axis),
            qo.stride(token_dim), qo.stride(head_axis), ko.stride(token_dim), ko.stride(head_axis),
            HEAD_DIM=q.shape[-1], HALF=cos.shape[-1] // 2, BLOCK=triton.next_power_of_2(q.shape[-1]),
            CAST_FIRST=cast_first, **pdl_launch(q.device))
    return qo, ko
