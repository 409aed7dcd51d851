"""Cached Mamba2 SSD scan, Triton backend: ``autodeploy::triton_cached_ssd_scan``.

Same signature and semantics as ``autodeploy::torch_cached_ssd_scan`` (the oracle; its module
docstring explains lanes, verify lanes and replay buffers), but one launch scans every lane of the
step at once, instead of a host loop. A program owns one (lane, head, block of head_dim rows) and
keeps that [BLOCK_P, d_state] slice of the state in registers, in float32, from start to end:

1. load the slot's state (zeros for a new sequence);
2. fold the lane's ``replay_lens`` replay tokens into it, step by step (the accepted drafts of the
   previous verify step);
3. run the lane's tokens: token by token (S = exp(dt A) S + dt x B^T, y = S C + D x) for short
   lanes (decode, verify), or a chunk of BLOCK_T tokens at a time in the SSD (state space dual)
   form with ``tl.dot`` for lanes of at least ``CHUNKED_MIN_TOKENS`` tokens (prefill): inside a
   chunk y = (C B^T * decay * dt) x + (C S^T) * exp(cumsum(dt A)), and S passes to the next chunk.
   The path is picked per lane on the device. With ``triton_ssd_chunks.PARALLEL_MIN_TOKENS`` set
   (off by default: measured slower, see there), lanes of at least that many tokens from a
   committed state (no replay, not verifying) are left to the chunk-parallel launches of
   ``triton_ssd_chunks.py`` (the same tiled form, split over chunks that run side by side);
4. write the state back: the final one for a committing lane, the replayed one for a verify lane.

A second, tiny kernel then stores the inputs (x, dt, B) of the verify lanes' tokens in the replay
buffers. It has to run after the scan: the replayed dt and B of a slot are read by every program of
its heads, so no program of the scan may overwrite them. The grids come from tensor shapes and the
lanes' lengths are only read on the device, so the op never syncs with the host (CUDA-graph safe).
For the same reason it does not raise on malformed metadata as the oracle does: replay and verify
lengths are clipped to the replay buffers' capacity (nothing is written out of bounds), and a
replay onto a lane without cached state starts from zeros.

dt is discretized as ``discretize_dt`` does it, rounding to dt's dtype after the bias, the softplus
and the clamp, so both backends see the same dt for bfloat16 inputs; everything else is float32.

Needs a GPU to launch, or ``TRITON_INTERPRET=1`` set before this module is imported (CPU tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autodeploy.custom_ops.triton_pdl import pdl_launch, pdl_wait

__all__ = ["triton_cached_ssd_scan", "launch_cached_ssd_scan", "CHUNKED_MIN_TOKENS"]

# Lanes with at least this many tokens take the chunked (tl.dot) path, shorter ones the
# token-by-token recurrence. Read at each call; the choice itself is made per lane on the device.
CHUNKED_MIN_TOKENS = 32
_MAX_CHUNK_TILE = 32  # largest BLOCK_T of the chunked path (64 spills registers at d_state 128)
_NUM_WARPS = 4


@triton.jit
def _round_like(v, ptr):
    """float32 ``v`` rounded to the dtype of ``ptr``'s elements (to nearest, ties to even), as float32.

    bfloat16 is rounded on the bits: Triton's interpreter truncates float32 -> bfloat16 casts,
    while GPUs and torch round to nearest even; this gives the same result everywhere."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _discretize_dt(raw, dt_ptr, bias, dt_min, dt_max, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr):
    """clamp(softplus(dt + dt_bias), dt_min, dt_max) in float32, each step rounded to the dtype of
    ``dt_ptr``'s elements as the torch math in that dtype does (a no-op for float32 dt)."""
    v = raw.to(tl.float32)
    if HAS_DT_BIAS:
        v = _round_like(v + _round_like(bias.to(tl.float32), dt_ptr), dt_ptr)
    if DT_SOFTPLUS:
        # torch's softplus: v above 20 passes through; else max(v, 0) + log1p(exp(-|v|)), with an
        # accurate log1p(u) = log(1 + u) * u / ((1 + u) - 1) (Goldberg) for small u
        u = tl.exp(-tl.abs(v))
        w = 1.0 + u
        log1p = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
        v = _round_like(tl.where(v > 20.0, v, tl.maximum(v, 0.0) + log1p), dt_ptr)
    return _round_like(tl.minimum(tl.maximum(v, dt_min), dt_max), dt_ptr)


@triton.jit
def _head_params(A_ptr, D_ptr, dt_bias_ptr, head, HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr):
    """One head's A and D in float32 (D 0 without one) and dt bias as stored (0 without one)."""
    A = tl.load(A_ptr + head).to(tl.float32)
    D = 0.0
    if HAS_D:
        D = tl.load(D_ptr + head).to(tl.float32)
    bias = 0.0
    if HAS_DT_BIAS:
        bias = tl.load(dt_bias_ptr + head)
    return A, D, bias


@triton.jit
def _scan_chunked(
    state, start, end, head, group, x_ptr, dt_ptr, B_ptr, C_ptr, y_ptr,
    stride_xt, stride_xh, stride_xp, stride_dtt, stride_dth, stride_bt, stride_bg, stride_bn,
    stride_ct, stride_cg, stride_cn, stride_yt, stride_yh, stride_yp,
    A, D, bias, dt_min, dt_max, offs_p, offs_n, p_ok, n_ok,
    BLOCK_T: tl.constexpr, HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    STORE_Y: tl.constexpr,
):
    """Tokens [start, end) of one head's [BLOCK_P, d_state] state slice in the chunked SSD form,
    BLOCK_T tokens at a time; stores their outputs if STORE_Y. Returns the state after them and the
    log decay sum(dt A) over them. Rows past ``end`` load x = B = C = 0 and dt = 0 (no decay), so
    they change neither the outputs nor the state."""
    offs_t = tl.arange(0, BLOCK_T)
    causal = offs_t[:, None] >= offs_t[None, :]
    log_decay = 0.0
    for first in range(start, end, BLOCK_T):
        t = first + offs_t
        t_ok = t < end
        xp_ok = t_ok[:, None] & p_ok[None, :]
        bn_ok = t_ok[:, None] & n_ok[None, :]
        xc = tl.load(x_ptr + t[:, None] * stride_xt + head * stride_xh + offs_p[None, :] * stride_xp,
                     mask=xp_ok, other=0.0).to(tl.float32)
        raw = tl.load(dt_ptr + t * stride_dtt + head * stride_dth, mask=t_ok, other=0.0)
        dtc = tl.where(t_ok, _discretize_dt(raw, dt_ptr, bias, dt_min, dt_max, HAS_DT_BIAS, DT_SOFTPLUS), 0.0)
        Bc = tl.load(B_ptr + t[:, None] * stride_bt + group * stride_bg + offs_n[None, :] * stride_bn,
                     mask=bn_ok, other=0.0).to(tl.float32)
        cum = tl.cumsum(dtc * A, axis=0)  # log decay from the tile's start through each token
        total = tl.sum(tl.where(offs_t == BLOCK_T - 1, cum, 0.0), axis=0)  # through its end
        if STORE_Y:
            Cc = tl.load(C_ptr + t[:, None] * stride_ct + group * stride_cg + offs_n[None, :] * stride_cn,
                         mask=bn_ok, other=0.0).to(tl.float32)
            # decay from source j to target i >= j: exp(cum_i - cum_j); 0 above the diagonal
            decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
            scores = tl.dot(Cc, tl.trans(Bc), input_precision="ieee") * decay * dtc[None, :]
            yc = tl.dot(scores, xc, input_precision="ieee")
            yc += tl.dot(Cc, tl.trans(state), input_precision="ieee") * tl.exp(cum)[:, None]
            if HAS_D:
                yc += D * xc
            tl.store(y_ptr + t[:, None] * stride_yt + head * stride_yh + offs_p[None, :] * stride_yp,
                     _round_like(yc, y_ptr).to(y_ptr.dtype.element_ty), mask=xp_ok)
        to_end = tl.exp(total - cum) * dtc  # [BLOCK_T]
        state = state * tl.exp(total) + tl.dot(tl.trans(xc * to_end[:, None]), Bc, input_precision="ieee")
        log_decay += total
    return state, log_decay


@triton.jit
def _cached_ssd_scan_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, y_ptr, state_ptr,
    rx_ptr, rdt_ptr, rB_ptr,
    slots_ptr, cu_seqlens_ptr, has_state_ptr, replay_lens_ptr, is_verify_ptr, skip_ptr,
    stride_xt, stride_xh, stride_xp,
    stride_dtt, stride_dth,
    stride_bt, stride_bg, stride_bn,
    stride_ct, stride_cg, stride_cn,
    stride_yt, stride_yh, stride_yp,
    stride_ss, stride_sh, stride_sp, stride_sn,
    stride_rxs, stride_rxt, stride_rxh, stride_rxp,
    stride_rdts, stride_rdtt, stride_rdth,
    stride_rbs, stride_rbt, stride_rbg, stride_rbn,
    replay_capacity, dt_min, dt_max, chunked_min_tokens, parallel_min_tokens,
    HEADS_PER_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_STATE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, CHUNKED: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    lane = tl.program_id(0)
    head = tl.program_id(1)
    group = head // HEADS_PER_GROUP
    start = tl.load(cu_seqlens_ptr + lane)
    end = tl.load(cu_seqlens_ptr + lane + 1)
    slot = tl.load(slots_ptr + lane).to(tl.int64)
    continues = tl.load(has_state_ptr + lane) != 0
    verify = tl.load(is_verify_ptr + lane) != 0
    replay = tl.minimum(tl.load(replay_lens_ptr + lane), replay_capacity)  # capacity 0: no buffers
    # Two compiled variants share the launch: CHUNKED serves the lanes of at least chunked_min_tokens
    # tokens, the other the rest; a program whose lane is the other variant's does nothing (it
    # sees an empty lane), so the decode variant is not burdened by the chunked path's registers.
    mine = (end - start >= chunked_min_tokens) == CHUNKED
    # long lanes from a committed state are the chunk-parallel launches' (triton_ssd_chunks.py)
    mine = mine & ~((end - start >= parallel_min_tokens) & (tl.load(replay_lens_ptr + lane) == 0) & ~verify)
    if HAS_SKIP:  # lanes another kernel serves (the flashinfer backend's plain decode lanes)
        mine = mine & (tl.load(skip_ptr + lane) == 0)
    end = tl.where(mine, end, start)
    replay = tl.where(mine, replay, 0)
    continues = continues & mine
    if (end == start) & (replay <= 0):  # nothing to scan, replay or store (padding, the other variant's lanes)
        return

    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    p_ok = offs_p < HEAD_DIM
    n_ok = offs_n < D_STATE
    # Triton's interpreter mishandles scalar & tensor masks: scalar conditions become row limits.
    load_rows = tl.where(continues, HEAD_DIM, 0)  # a new sequence starts from zeros
    replayed_rows = tl.where(verify, tl.where(replay > 0, HEAD_DIM, 0), 0)
    final_rows = tl.where(verify, 0, tl.where(end - start + tl.maximum(replay, 0) > 0, HEAD_DIM, 0))
    state_ptrs = (state_ptr + slot * stride_ss + head * stride_sh
                  + offs_p[:, None] * stride_sp + offs_n[None, :] * stride_sn)
    state = tl.load(state_ptrs, mask=(offs_p < load_rows)[:, None] & n_ok[None, :], other=0.0).to(tl.float32)

    A, D, bias = _head_params(A_ptr, D_ptr, dt_bias_ptr, head, HAS_D, HAS_DT_BIAS)

    # Replay: the accepted drafts of the slot's last verify step, onto the committed state.
    for i in range(0, replay):
        xv = tl.load(rx_ptr + slot * stride_rxs + i * stride_rxt + head * stride_rxh + offs_p * stride_rxp,
                     mask=p_ok, other=0.0).to(tl.float32)
        dtv = _discretize_dt(tl.load(rdt_ptr + slot * stride_rdts + i * stride_rdtt + head * stride_rdth),
                             rdt_ptr, bias, dt_min, dt_max, HAS_DT_BIAS, DT_SOFTPLUS)
        Bv = tl.load(rB_ptr + slot * stride_rbs + i * stride_rbt + group * stride_rbg + offs_n * stride_rbn,
                     mask=n_ok, other=0.0).to(tl.float32)
        state = state * tl.exp(dtv * A) + (dtv * xv)[:, None] * Bv[None, :]
    # A verify lane keeps this (replayed) state as the slot's committed one.
    tl.store(state_ptrs, state, mask=(offs_p < replayed_rows)[:, None] & n_ok[None, :])

    if CHUNKED:
        state, _ = _scan_chunked(
            state, start, end, head, group, x_ptr, dt_ptr, B_ptr, C_ptr, y_ptr,
            stride_xt, stride_xh, stride_xp, stride_dtt, stride_dth, stride_bt, stride_bg, stride_bn,
            stride_ct, stride_cg, stride_cn, stride_yt, stride_yh, stride_yp,
            A, D, bias, dt_min, dt_max, offs_p, offs_n, p_ok, n_ok,
            BLOCK_T, HAS_D, HAS_DT_BIAS, DT_SOFTPLUS, True)
    else:
        for t in range(start, end):
            xv = tl.load(x_ptr + t * stride_xt + head * stride_xh + offs_p * stride_xp,
                         mask=p_ok, other=0.0).to(tl.float32)
            dtv = _discretize_dt(tl.load(dt_ptr + t * stride_dtt + head * stride_dth),
                                 dt_ptr, bias, dt_min, dt_max, HAS_DT_BIAS, DT_SOFTPLUS)
            Bv = tl.load(B_ptr + t * stride_bt + group * stride_bg + offs_n * stride_bn,
                         mask=n_ok, other=0.0).to(tl.float32)
            Cv = tl.load(C_ptr + t * stride_ct + group * stride_cg + offs_n * stride_cn,
                         mask=n_ok, other=0.0).to(tl.float32)
            state = state * tl.exp(dtv * A) + (dtv * xv)[:, None] * Bv[None, :]
            yv = tl.sum(state * Cv[None, :], axis=1)
            if HAS_D:
                yv += D * xv
            tl.store(y_ptr + t * stride_yt + head * stride_yh + offs_p * stride_yp,
                     _round_like(yv, y_ptr).to(y_ptr.dtype.element_ty), mask=p_ok)

    # A committing lane with work (tokens or a replay) writes its final state; a padded lane
    # (0 tokens, no replay) writes nothing, so slot 0 shared by padded lanes is never touched.
    tl.store(state_ptrs, state, mask=(offs_p < final_rows)[:, None] & n_ok[None, :])


@triton.jit
def _store_verify_inputs_kernel(
    x_ptr, dt_ptr, B_ptr, rx_ptr, rdt_ptr, rB_ptr,
    slots_ptr, cu_seqlens_ptr, is_verify_ptr,
    stride_xt, stride_xh, stride_xp,
    stride_dtt, stride_dth,
    stride_bt, stride_bg, stride_bn,
    stride_rxs, stride_rxt, stride_rxh, stride_rxp,
    stride_rdts, stride_rdtt, stride_rdth,
    stride_rbs, stride_rbt, stride_rbg, stride_rbn,
    replay_capacity,
    HEADS_PER_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_STATE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    # One program per (lane, head): copy a verify lane's tokens' x, dt (and B, from the first head
    # of each group) to positions 0.. of its slot's replay buffers, in the buffers' dtypes.
    lane = tl.program_id(0)
    head = tl.program_id(1)
    start = tl.load(cu_seqlens_ptr + lane)
    end = tl.load(cu_seqlens_ptr + lane + 1)
    slot = tl.load(slots_ptr + lane).to(tl.int64)
    verify = tl.load(is_verify_ptr + lane) != 0
    count = tl.where(verify, tl.minimum(end - start, replay_capacity), 0)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < count
    t = start + offs_r
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)

    xp_ok = r_ok[:, None] & (offs_p < HEAD_DIM)[None, :]
    xv = tl.load(x_ptr + t[:, None] * stride_xt + head * stride_xh + offs_p[None, :] * stride_xp, mask=xp_ok)
    tl.store(rx_ptr + slot * stride_rxs + offs_r[:, None] * stride_rxt + head * stride_rxh
             + offs_p[None, :] * stride_rxp, xv.to(rx_ptr.dtype.element_ty), mask=xp_ok)
    dtv = tl.load(dt_ptr + t * stride_dtt + head * stride_dth, mask=r_ok)
    tl.store(rdt_ptr + slot * stride_rdts + offs_r * stride_rdtt + head * stride_rdth,
             dtv.to(rdt_ptr.dtype.element_ty), mask=r_ok)
    group = head // HEADS_PER_GROUP
    count_b = tl.where(head % HEADS_PER_GROUP == 0, count, 0)
    bn_ok = (offs_r < count_b)[:, None] & (offs_n < D_STATE)[None, :]
    Bv = tl.load(B_ptr + t[:, None] * stride_bt + group * stride_bg + offs_n[None, :] * stride_bn, mask=bn_ok)
    tl.store(rB_ptr + slot * stride_rbs + offs_r[:, None] * stride_rbt + group * stride_rbg
             + offs_n[None, :] * stride_rbn, Bv.to(rB_ptr.dtype.element_ty), mask=bn_ok)


@torch.library.custom_op("autodeploy::triton_cached_ssd_scan",
                         mutates_args=("ssm_state", "replay_x", "replay_dt", "replay_B"))
def triton_cached_ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    ssm_state: torch.Tensor,
    replay_x: torch.Tensor | None,
    replay_dt: torch.Tensor | None,
    replay_B: torch.Tensor | None,
    slots: torch.Tensor,
    cu_seqlens: torch.Tensor,
    has_state: torch.Tensor,
    replay_lens: torch.Tensor,
    is_verify: torch.Tensor,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    chunk_size: int,
) -> torch.Tensor:
    """x: [1, T, h, p]; dt: [1, T, h]; B, C: [1, T, g, n]; ssm_state: [slots, h, p, n] float32;
    replay_x/dt/B: [slots, R, h, p] / [slots, R, h] / [slots, R, g, n] (None without speculation).

    Returns y [1, T, h, p] in x's dtype. ``chunk_size`` sets the chunked path's tile (a power of two
    in [16, 32]); the result does not depend on it beyond float rounding.
    """
    return launch_cached_ssd_scan(x, dt, A, B, C, D, dt_bias, ssm_state, replay_x, replay_dt, replay_B, slots,
                                  cu_seqlens, has_state, replay_lens, is_verify, dt_softplus, dt_min, dt_max,
                                  chunk_size)


def launch_cached_ssd_scan(x, dt, A, B, C, D, dt_bias, ssm_state, replay_x, replay_dt, replay_B, slots, cu_seqlens,
                           has_state, replay_lens, is_verify, dt_softplus, dt_min, dt_max, chunk_size,
                           y: torch.Tensor | None = None, skip: torch.Tensor | None = None) -> torch.Tensor:
    """The op's work, into ``y`` (a [1, T, h, p] buffer; new if None), leaving the lanes where
    ``skip`` [lanes] is true untouched (their outputs, state and replay buffers)."""
    num_tokens, h, p = x.shape[1:]
    g, n = B.shape[2:]
    if h % g:
        raise ValueError(f"SSM heads ({h}) must be a multiple of groups ({g})")
    y = torch.empty_like(x) if y is None else y
    lanes = slots.shape[0]
    has_replay = replay_x is not None
    if lanes == 0 or (num_tokens == 0 and not has_replay):
        return y
    # With no tokens (a replay-only step) the token tensors may have no storage: point at the state.
    x0, dt0, B0, C0, y0 = (t[0] if num_tokens else ssm_state for t in (x, dt, B, C, y))
    x_s, dt_s, B_s, C_s, y_s = x[0].stride(), dt[0].stride(), B[0].stride(), C[0].stride(), y[0].stride()
    if has_replay:
        rx, rdt, rB, capacity = replay_x, replay_dt, replay_B, replay_x.shape[1]
        rx_s, rdt_s, rB_s = replay_x.stride(), replay_dt.stride(), replay_B.stride()
    else:
        rx, rdt, rB, capacity = ssm_state, ssm_state, ssm_state, 0
        rx_s, rdt_s, rB_s = (0,) * 4, (0,) * 3, (0,) * 4
    # bool flags are read as bytes; integer flags as they are
    has_state_u8, is_verify_u8 = (t.view(torch.uint8) if t.dtype == torch.bool else t
                                  for t in (has_state, is_verify))
    block_p = 16  # small tiles: decode parallelism comes from (lanes x heads x p-blocks)
    block_n = max(16, triton.next_power_of_2(n))
    block_t = max(16, min(_MAX_CHUNK_TILE, triton.next_power_of_2(chunk_size)))

    # the recurrent (decode, verify, short) lanes, then the long ones; a step of fewer tokens than
    # CHUNKED_MIN_TOKENS has no long lane, one of fewer than PARALLEL_MIN_TOKENS no lane for the
    # chunk-parallel launches (shape facts, so a captured graph stays valid)
    from autodeploy.custom_ops import triton_ssd_chunks

    parallel_min = triton_ssd_chunks.PARALLEL_MIN_TOKENS
    parallel = parallel_min is not None and num_tokens >= parallel_min
    for chunked in (False, True) if num_tokens >= CHUNKED_MIN_TOKENS else (False,):
        _cached_ssd_scan_kernel[(lanes, h, triton.cdiv(p, block_p))](
            x0, dt0, A, B0, C0, D if D is not None else A, dt_bias if dt_bias is not None else A, y0, ssm_state,
            rx, rdt, rB,
            slots, cu_seqlens, has_state_u8, replay_lens, is_verify_u8,
            skip.view(torch.uint8) if skip is not None else slots,
            *x_s, *dt_s, *B_s, *C_s, *y_s, *ssm_state.stride(), *rx_s, *rdt_s, *rB_s,
            capacity, float(dt_min), float(dt_max), CHUNKED_MIN_TOKENS,
            parallel_min if parallel else 2**30,
            HEADS_PER_GROUP=h // g, HEAD_DIM=p, D_STATE=n,
            BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_T=block_t,
            HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=bool(dt_softplus),
            CHUNKED=chunked, HAS_SKIP=skip is not None, num_warps=_NUM_WARPS, **pdl_launch(x.device),
        )
    if parallel:  # the lanes the scan left (disjoint slots and outputs: the order is free)
        triton_ssd_chunks.launch_parallel_chunks(
            x0, dt0, A, B0, C0, D, dt_bias, y0, ssm_state, slots, cu_seqlens, has_state_u8, replay_lens,
            is_verify_u8, dt_softplus, dt_min, dt_max, num_tokens, h, p, g, n, block_p, block_n, block_t)
    if has_replay and num_tokens:
        _store_verify_inputs_kernel[(lanes, h)](
            x0, dt0, B0, rx, rdt, rB,
            slots, cu_seqlens, is_verify_u8,
            *x_s, *dt_s, *B_s, *rx_s, *rdt_s, *rB_s,
            capacity,
            HEADS_PER_GROUP=h // g, HEAD_DIM=p, D_STATE=n,
            BLOCK_R=triton.next_power_of_2(max(capacity, 1)), BLOCK_P=triton.next_power_of_2(p), BLOCK_N=block_n,
            **pdl_launch(x.device),
        )
    return y


@triton_cached_ssd_scan.register_fake
def _(x, dt, A, B, C, D, dt_bias, ssm_state, replay_x, replay_dt, replay_B, slots, cu_seqlens, has_state,
      replay_lens, is_verify, dt_softplus, dt_min, dt_max, chunk_size):
    return torch.empty_like(x)
