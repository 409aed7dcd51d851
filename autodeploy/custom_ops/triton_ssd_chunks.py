"""Chunk-parallel prefill for the Triton SSD scan (``triton_ssd_scan.launch_cached_ssd_scan``).

The scan kernel walks a lane's tokens in order: a 2k-token prefill is 64 dependent tiles per
(head, block of head_dim rows), a few hundred programs on a GPU with thousands of slots (14.8 ms
of bench-hybrid's 18.9 ms captured 2k prefill on an H200). Lanes of at least ``PARALLEL_MIN_TOKENS``
tokens that start from a committed state (no replay, not verifying) go through three launches
instead, split into chunks of ``PARALLEL_CHUNK`` tokens:

1. chunk states, one program per (chunk, head, row block): the chunk's tokens from a zero state,
   the same tiled SSD form as the scan (``_scan_chunked``), keeping only the resulting state U_c
   and the chunk's log decay a_c = sum(dt A);
2. state passing, one program per (lane, head, row block): S_0 = the slot's state (zeros for a new
   sequence), S_{c+1} = exp(a_c) S_c + U_c over the lane's chunks in order, each S_c stored in
   place of U_c, the last written back to the slot;
3. outputs, one program per (chunk, head, row block): the chunk's tokens from S_c with outputs.

Exact algebra (the state is linear in its start), so only float rounding differs from the scan.

Off by default (``PARALLEL_MIN_TOKENS = None``; set it to a token count to turn it on): measured
slower, not faster (H200, bench-hybrid-0.6b captured 2k prefill: 19.4 ms with it, 18.7 ms
with the serial scan). The serial scan's 256 programs (64 heads x 4 row blocks) already keep every SM
busy, so its cost is the tile arithmetic, not the chain of dependent tiles, and splitting the chain
adds launch 1's work. It can only pay where a step's serial grid leaves SMs idle (few heads, one
long lane); a faster scan needs cheaper tile math (tensor-core sized tiles), which this three-launch
structure (chunk states, state passing, outputs) is the skeleton for.
Chunks never straddle lanes; every program finds its chunk's lane from ``cu_seqlens`` (a cumsum
over lanes), so the launches are the op's only work and it stays CUDA-graph safe. The scratch
holds one float32 state per chunk: (T / PARALLEL_CHUNK + T / PARALLEL_MIN_TOKENS) x h x p x n.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autodeploy.custom_ops.triton_lanes import lane_lengths, lane_run, owning_lane
from autodeploy.custom_ops.triton_ssd_scan import _head_params, _scan_chunked

__all__ = ["PARALLEL_MIN_TOKENS", "PARALLEL_CHUNK", "launch_parallel_chunks"]

PARALLEL_MIN_TOKENS: int | None = None  # off (see above); lanes with fewer tokens stay in the scan kernel
PARALLEL_CHUNK = 256


@triton.jit
def _lane_chunks(cu_seqlens_ptr, replay_lens_ptr, is_verify_ptr, num_lanes, min_tokens,
                 CHUNK: tl.constexpr, BLOCK_L: tl.constexpr):
    """[BLOCK_L] chunk counts per lane: lanes of at least ``min_tokens`` tokens with no replay and
    no verify own runs of ceil(n / CHUNK) consecutive chunk ids, in lane order (triton_lanes)."""
    lanes = tl.arange(0, BLOCK_L)
    ok = lanes < num_lanes
    n = lane_lengths(cu_seqlens_ptr, num_lanes, BLOCK_L)
    served = ok & (n >= min_tokens) & (tl.load(replay_lens_ptr + lanes, mask=ok, other=1) == 0) \
        & (tl.load(is_verify_ptr + lanes, mask=ok, other=1) == 0)
    return tl.where(served, (n + CHUNK - 1) // CHUNK, 0)


@triton.jit
def _chunk_lane(cu_seqlens_ptr, replay_lens_ptr, is_verify_ptr, chunk, num_lanes, min_tokens,
                CHUNK: tl.constexpr, BLOCK_L: tl.constexpr):
    """(lane, first token, end token) of chunk id ``chunk``; an empty range past every lane's chunks."""
    chunks = _lane_chunks(cu_seqlens_ptr, replay_lens_ptr, is_verify_ptr, num_lanes, min_tokens, CHUNK, BLOCK_L)
    lane, before, owned = owning_lane(chunks, chunk, num_lanes, BLOCK_L)
    lane_end = tl.load(cu_seqlens_ptr + lane + 1)
    first = tl.load(cu_seqlens_ptr + lane) + (chunk - before) * CHUNK
    first = tl.where(chunk - before < owned, first, lane_end)  # not one of the lane's chunks: empty
    return lane, first, tl.minimum(first + CHUNK, lane_end)


@triton.jit
def _chunk_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, y_ptr, chunk_state_ptr, chunk_decay_ptr,
    cu_seqlens_ptr, replay_lens_ptr, is_verify_ptr, num_lanes, min_tokens,
    stride_xt, stride_xh, stride_xp, stride_dtt, stride_dth, stride_bt, stride_bg, stride_bn,
    stride_ct, stride_cg, stride_cn, stride_yt, stride_yh, stride_yp,
    dt_min, dt_max,
    HEADS: tl.constexpr, HEADS_PER_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_STATE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr,
    CHUNK: tl.constexpr, HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    OUTPUTS: tl.constexpr,
):
    """Launch 1 (OUTPUTS False: the chunk's state from zeros and its log decay) or launch 3
    (OUTPUTS True: the chunk's outputs from the state stored for it by launch 2)."""
    chunk = tl.program_id(0)
    head = tl.program_id(1)
    group = head // HEADS_PER_GROUP
    _, first, end = _chunk_lane(cu_seqlens_ptr, replay_lens_ptr, is_verify_ptr, chunk, num_lanes, min_tokens,
                                CHUNK, BLOCK_L)
    if end <= first:
        return
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    p_ok, n_ok = offs_p < HEAD_DIM, offs_n < D_STATE
    pn_ok = p_ok[:, None] & n_ok[None, :]
    state_ptrs = (chunk_state_ptr + (chunk.to(tl.int64) * HEADS + head) * (HEAD_DIM * D_STATE)
                  + offs_p[:, None] * D_STATE + offs_n[None, :])
    A, D, bias = _head_params(A_ptr, D_ptr, dt_bias_ptr, head, HAS_D, HAS_DT_BIAS)
    if OUTPUTS:
        state = tl.load(state_ptrs, mask=pn_ok, other=0.0)
    else:
        state = tl.zeros([BLOCK_P, BLOCK_N], tl.float32)
    state, log_decay = _scan_chunked(
        state, first, end, head, group, x_ptr, dt_ptr, B_ptr, C_ptr, y_ptr,
        stride_xt, stride_xh, stride_xp, stride_dtt, stride_dth, stride_bt, stride_bg, stride_bn,
        stride_ct, stride_cg, stride_cn, stride_yt, stride_yh, stride_yp,
        A, D, bias, dt_min, dt_max, offs_p, offs_n, p_ok, n_ok,
        BLOCK_T, HAS_D, HAS_DT_BIAS, DT_SOFTPLUS, OUTPUTS)
    if not OUTPUTS:
        tl.store(state_ptrs, state, mask=pn_ok)
        if tl.program_id(2) == 0:
            tl.store(chunk_decay_ptr + chunk * HEADS + head, log_decay)


@triton.jit
def _pass_states_kernel(
    state_ptr, chunk_state_ptr, chunk_decay_ptr, slots_ptr, cu_seqlens_ptr, has_state_ptr, replay_lens_ptr,
    is_verify_ptr, num_lanes, min_tokens,
    stride_ss, stride_sh, stride_sp, stride_sn,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_STATE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, CHUNK: tl.constexpr,
):
    """Launch 2: the state entering each of the lane's chunks, in order; the last to the slot."""
    lane = tl.program_id(0)
    head = tl.program_id(1)
    chunks = _lane_chunks(cu_seqlens_ptr, replay_lens_ptr, is_verify_ptr, num_lanes, min_tokens, CHUNK, BLOCK_L)
    first_chunk, num_chunks = lane_run(chunks, tl.cumsum(chunks, axis=0), lane, BLOCK_L)
    if num_chunks == 0:
        return
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    pn_ok = (offs_p < HEAD_DIM)[:, None] & (offs_n < D_STATE)[None, :]
    slot = tl.load(slots_ptr + lane).to(tl.int64)
    slot_ptrs = (state_ptr + slot * stride_ss + head * stride_sh
                 + offs_p[:, None] * stride_sp + offs_n[None, :] * stride_sn)
    load_rows = tl.where(tl.load(has_state_ptr + lane) != 0, HEAD_DIM, 0)  # a new sequence starts from zeros
    state = tl.load(slot_ptrs, mask=(offs_p < load_rows)[:, None] & (offs_n < D_STATE)[None, :], other=0.0)
    state = state.to(tl.float32)
    for c in range(first_chunk, first_chunk + num_chunks):
        ptrs = (chunk_state_ptr + (c * HEADS + head) * (HEAD_DIM * D_STATE)  # c: int64 (a sum of int64)
                + offs_p[:, None] * D_STATE + offs_n[None, :])
        local = tl.load(ptrs, mask=pn_ok, other=0.0)
        tl.store(ptrs, state, mask=pn_ok)
        state = state * tl.exp(tl.load(chunk_decay_ptr + c * HEADS + head)) + local
    tl.store(slot_ptrs, state, mask=pn_ok)


def launch_parallel_chunks(x0, dt0, A, B0, C0, D, dt_bias, y0, ssm_state, slots, cu_seqlens, has_state_u8,
                           replay_lens, is_verify_u8, dt_softplus, dt_min, dt_max, num_tokens, h, p, g, n,
                           block_p, block_n, block_t) -> None:
    """The three launches for every lane the scan kernel leaves to them (``min_tokens`` and up)."""
    lanes = slots.shape[0]
    max_chunks = num_tokens // PARALLEL_CHUNK + num_tokens // PARALLEL_MIN_TOKENS + 1  # shape-only bound
    chunk_state = torch.empty(max_chunks, h, p, n, dtype=torch.float32, device=x0.device)
    chunk_decay = torch.empty(max_chunks, h, dtype=torch.float32, device=x0.device)
    block_l = max(2, triton.next_power_of_2(lanes))
    strides = (*x0.stride(), *dt0.stride(), *B0.stride(), *C0.stride(), *y0.stride())
    for outputs in (False, True):
        if outputs:
            _pass_states_kernel[(lanes, h, triton.cdiv(p, block_p))](
                ssm_state, chunk_state, chunk_decay, slots, cu_seqlens, has_state_u8, replay_lens, is_verify_u8,
                lanes, PARALLEL_MIN_TOKENS, *ssm_state.stride(),
                HEADS=h, HEAD_DIM=p, D_STATE=n, BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_L=block_l,
                CHUNK=PARALLEL_CHUNK)
        _chunk_kernel[(max_chunks, h, triton.cdiv(p, block_p))](
            x0, dt0, A, B0, C0, D if D is not None else A, dt_bias if dt_bias is not None else A, y0,
            chunk_state, chunk_decay, cu_seqlens, replay_lens, is_verify_u8, lanes, PARALLEL_MIN_TOKENS,
            *strides, float(dt_min), float(dt_max),
            HEADS=h, HEADS_PER_GROUP=h // g, HEAD_DIM=p, D_STATE=n, BLOCK_P=block_p, BLOCK_N=block_n,
            BLOCK_T=block_t, BLOCK_L=block_l, CHUNK=PARALLEL_CHUNK, HAS_D=D is not None,
            HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=bool(dt_softplus), OUTPUTS=outputs, num_warps=4)
