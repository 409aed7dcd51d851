"""Triton kernel of the flashinfer SSM backend's lane split (``flashinfer_ssd_scan.decode_lane_inputs``).

One program per lane decides whether the lane is a plain decode lane (one token, continuing a
cached state, nothing to replay, not verifying), writes its state index for flashinfer's
``selective_state_update`` (the pad slot otherwise) and the row its output goes to (the spare row
``num_tokens`` otherwise), and gathers the decode kernel's inputs from the lane's token into
contiguous rows (token 0 for the other lanes: read, never used). Strided inputs are fine.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["decode_lane_inputs_kernel"]


@triton.jit
def decode_lane_inputs_kernel(
    x_ptr, dt_ptr, B_ptr, C_ptr, slots_ptr, cu_seqlens_ptr, has_state_ptr, replay_lens_ptr, is_verify_ptr,
    plain_ptr, state_idx_ptr, out_rows_ptr, x_out_ptr, dt_out_ptr, B_out_ptr, C_out_ptr, num_tokens,
    stride_xt, stride_xh, stride_xp, stride_dt, stride_dh,
    stride_bt, stride_bg, stride_bn, stride_ct, stride_cg, stride_cn,
    H: tl.constexpr, P: tl.constexpr, G: tl.constexpr, N: tl.constexpr,
    BLOCK_HP: tl.constexpr, BLOCK_GN: tl.constexpr, BLOCK_H: tl.constexpr, PAD: tl.constexpr,
):
    lane = tl.program_id(0)
    first = tl.load(cu_seqlens_ptr + lane)
    n_tokens = tl.load(cu_seqlens_ptr + lane + 1) - first
    plain = ((n_tokens == 1) & (tl.load(has_state_ptr + lane) != 0) & (tl.load(replay_lens_ptr + lane) == 0)
             & (tl.load(is_verify_ptr + lane) == 0))
    tl.store(plain_ptr + lane, plain.to(tl.uint8))
    tl.store(state_idx_ptr + lane, tl.where(plain, tl.load(slots_ptr + lane).to(tl.int64), PAD))
    tl.store(out_rows_ptr + lane, tl.where(plain, first, num_tokens).to(tl.int64))
    token = tl.where(plain, first, 0).to(tl.int64)

    e = tl.arange(0, BLOCK_HP)  # x row: H x P
    ok = e < H * P
    xv = tl.load(x_ptr + token * stride_xt + (e // P) * stride_xh + (e % P) * stride_xp, mask=ok)
    tl.store(x_out_ptr + lane * (H * P) + e, xv, mask=ok)
    hh = tl.arange(0, BLOCK_H)
    dv = tl.load(dt_ptr + token * stride_dt + hh * stride_dh, mask=hh < H)
    tl.store(dt_out_ptr + lane * H + hh, dv, mask=hh < H)
    f = tl.arange(0, BLOCK_GN)  # B and C rows: G x N
    ok = f < G * N
    bv = tl.load(B_ptr + token * stride_bt + (f // N) * stride_bg + (f % N) * stride_bn, mask=ok)
    tl.store(B_out_ptr + lane * (G * N) + f, bv, mask=ok)
    cv = tl.load(C_ptr + token * stride_ct + (f // N) * stride_cg + (f % N) * stride_cn, mask=ok)
    tl.store(C_out_ptr + lane * (G * N) + f, cv, mask=ok)
