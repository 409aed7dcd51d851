"""Cached causal depthwise conv1d, Triton backend: ``autodeploy::triton_cached_causal_conv1d``.

Same signature and semantics as ``autodeploy::torch_cached_causal_conv1d`` (the oracle; its module
docstring explains lanes, verify lanes and replay), but two kernel launches serve every lane of the
step at once instead of a host loop over lanes:

1. the lane kernel, one program per (lane, block of channels): folds the lane's replayed columns
   into its slot's state, stages that starting state (the k-1 columns in front of the lane's
   tokens) in a small per-lane buffer, writes the slot's new state (after the tokens when the lane
   commits, after the replay alone when it verifies) and copies a verify lane's input columns into
   its slot's replay buffer;
2. the output kernel, one program per (block of tokens, block of channels): token blocks may span
   several lanes; every token looks up its lane and reads the columns in front of the lane's first
   tokens from the staged buffer, never from the state cache, so the order of the state write-back
   and the output reads does not matter.

Values take the oracle's dtype path (window columns in the weight's dtype, products summed in
float32, the result rounded to the weight's dtype before the activation), so float32 matches to
rounding and bfloat16 to bf16 resolution. The grids follow tensor shapes and each token finds its
lane inside the output kernel: the op is its two launches, never syncs with the host (CUDA-graph
safe) and launches no per-layer torch ops. Lanes with work (tokens or a replay) must use distinct
slots, as the engine guarantees; padded lanes (0 tokens, no replay, slot 0) write nothing.
Metadata outside the contract (a replay or verify longer than the replay buffer, a replay onto a
sequence without state) cannot be raised from a kernel: every access to the replay buffer is
masked, so such a lane writes only its own slot; the oracle raises, and checked mode's
``check_ssm_metadata`` (once per step, not per layer) names it, as for the Triton SSD scan.

Needs a GPU to launch, or ``TRITON_INTERPRET=1`` set before this module is imported (CPU tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from autodeploy.custom_ops.causal_conv1d import ACTIVATIONS
from autodeploy.custom_ops.triton_pdl import pdl_launch, pdl_wait

__all__ = ["triton_cached_causal_conv1d", "launch_cached_causal_conv1d"]


@triton.jit
def _state_columns(conv_state_ptr, replay_ptr, slot, ch, ch_ok, src, state_cols, replay_capacity,
                   stride_ss, stride_sc, stride_sk, stride_rs, stride_rt, stride_rc,
                   KM1: tl.constexpr, HAS_REPLAY: tl.constexpr):
    """Columns ``src`` ([BLOCK_K]) of [slot's state (k-1 columns), replayed columns...], in the state's
    dtype; the first ``state_cols`` of the state are read (k-1, or 0: a new sequence starts from zeros)."""
    in_state = src < KM1
    cols = tl.load(conv_state_ptr + slot * stride_ss + ch[:, None] * stride_sc + src[None, :] * stride_sk,
                   mask=ch_ok[:, None] & (src < state_cols)[None, :], other=0.0)
    if HAS_REPLAY:
        row = src - KM1
        replayed = tl.load(replay_ptr + slot * stride_rs + row[None, :] * stride_rt + ch[:, None] * stride_rc,
                           mask=ch_ok[:, None] & (~in_state & (row < replay_capacity))[None, :], other=0.0)
        cols = tl.where(in_state[None, :], cols, replayed.to(conv_state_ptr.dtype.element_ty))
    return cols


@triton.jit
def _lane_state_kernel(
    x_ptr, w_ptr, conv_state_ptr, replay_ptr, start_state_ptr,
    slots_ptr, cu_seqlens_ptr, has_state_ptr, replay_lens_ptr, is_verify_ptr, skip_ptr,
    channels, replay_capacity,
    stride_xc, stride_xt,
    stride_ss, stride_sc, stride_sk,
    stride_rs, stride_rt, stride_rc,
    stride_pl, stride_pc, stride_pk,
    KM1: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_REPLAY: tl.constexpr, HAS_SKIP: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    lane = tl.program_id(0)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = ch < channels
    start = tl.load(cu_seqlens_ptr + lane)
    n = tl.load(cu_seqlens_ptr + lane + 1) - start
    slot = tl.load(slots_ptr + lane).to(tl.int64)
    # Scalar conditions enter masks as column bounds: Triton 3.9's interpreter turns `block & scalar`
    # masks into int32, which tl.load rejects.
    state_cols = tl.where(tl.load(has_state_ptr + lane) != 0, KM1, 0)
    replay = tl.load(replay_lens_ptr + lane)
    verify = tl.load(is_verify_ptr + lane) != 0
    if HAS_SKIP:  # a lane another kernel serves (the fused Mamba mixer's): as if it had no work
        mine = tl.load(skip_ptr + lane) == 0
        n = tl.where(mine, n, 0)
        replay = tl.where(mine, replay, 0)
        verify = verify & mine
    commit = (n > 0) & ~verify

    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < KM1
    mask = ch_ok[:, None] & col_ok[None, :]
    state_args = (conv_state_ptr, replay_ptr, slot, ch, ch_ok)
    strides = (stride_ss, stride_sc, stride_sk, stride_rs, stride_rt, stride_rc)
    # the state after the replay: the last k-1 of [state, replayed columns]
    start_state = _state_columns(*state_args, replay + cols, state_cols, replay_capacity, *strides,
                                 KM1=KM1, HAS_REPLAY=HAS_REPLAY)
    # a committing lane's new state: the last k-1 columns of the window [start_state, tokens],
    # taken through the weight's dtype like the window the oracle convolves
    win = n + cols
    from_start = win < KM1
    tail_state = _state_columns(*state_args, replay + win, state_cols, replay_capacity, *strides,
                                KM1=KM1, HAS_REPLAY=HAS_REPLAY)
    tail_x = tl.load(x_ptr + ch[:, None] * stride_xc + (start + win - KM1)[None, :] * stride_xt,
                     mask=mask & ~from_start[None, :], other=0.0)
    tail = tl.where(from_start[None, :], tail_state.to(w_ptr.dtype.element_ty), tail_x.to(w_ptr.dtype.element_ty))
    new_state = tl.where(commit, tail.to(conv_state_ptr.dtype.element_ty), start_state)

    tl.debug_barrier()  # every read of this slot's state and replay buffer precedes the writes below
    tl.store(start_state_ptr + lane * stride_pl + ch[:, None] * stride_pc + cols[None, :] * stride_pk,
             start_state, mask=mask)
    written_cols = tl.where(commit | (replay > 0), KM1, 0)  # padded lanes write nothing
    tl.store(conv_state_ptr + slot * stride_ss + ch[:, None] * stride_sc + cols[None, :] * stride_sk,
             new_state, mask=ch_ok[:, None] & (cols < written_cols)[None, :])
    if HAS_REPLAY:  # a verify lane keeps its inputs for the next step's replay
        n_keep = tl.where(verify, tl.minimum(n, replay_capacity), 0)
        for first in range(0, n_keep, BLOCK_T):
            t = first + tl.arange(0, BLOCK_T)
            keep = (t < n_keep)[:, None] & ch_ok[None, :]
            inputs = tl.load(x_ptr + ch[None, :] * stride_xc + (start + t)[:, None] * stride_xt, mask=keep)
            tl.store(replay_ptr + slot * stride_rs + t[:, None] * stride_rt + ch[None, :] * stride_rc,
                     inputs.to(replay_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _conv_output_kernel(
    x_ptr, w_ptr, b_ptr, start_state_ptr, out_ptr, cu_seqlens_ptr,
    channels, num_tokens, num_lanes,
    stride_xc, stride_xt, stride_oc, stride_ot, stride_wc, stride_wk,
    stride_pl, stride_pc, stride_pk,
    KW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok, ch_ok = t < num_tokens, ch < channels
    ok = ch_ok[:, None] & t_ok[None, :]
    # token t belongs to the lane whose [cu[b], cu[b + 1]) holds it: the number of lane ends <= t
    # (lanes of 0 tokens hold none; tokens past the last end stay in the last lane), by a binary
    # search over the sorted ends, SEARCH_STEPS = ceil(log2(lanes + 1)) halvings per token (a loop,
    # not a static_range: triton 3.6's layout pass fails on the unrolled form with int64 ends)
    lo = tl.zeros([BLOCK_T], tl.int32)
    hi = lo + num_lanes
    for _ in range(SEARCH_STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        right = active & (tl.load(cu_seqlens_ptr + 1 + mid, mask=active, other=0).to(tl.int32) <= t)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    lane = tl.minimum(lo, num_lanes - 1)
    pos = t - tl.load(cu_seqlens_ptr + lane, mask=t_ok, other=0)  # position of the token in its lane
    w_dtype = w_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_C, BLOCK_T], tl.float32)
    for j in tl.static_range(KW):
        # tap j of token pos reads window column pos + j; the first k-1 are the lane's start state
        in_state = (pos + j < KW - 1)[None, :]
        staged = tl.load(start_state_ptr + lane[None, :] * stride_pl + ch[:, None] * stride_pc
                         + (pos + j)[None, :] * stride_pk, mask=ok & in_state, other=0.0)
        inputs = tl.load(x_ptr + ch[:, None] * stride_xc + (t + j - (KW - 1))[None, :] * stride_xt,
                         mask=ok & ~in_state, other=0.0)
        column = tl.where(in_state, staged.to(w_dtype), inputs.to(w_dtype)).to(tl.float32)
        tap = tl.load(w_ptr + ch * stride_wc + j * stride_wk, mask=ch_ok, other=0.0).to(tl.float32)
        acc += tap[:, None] * column
    if HAS_BIAS:
        acc += tl.load(b_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)[:, None]
    y = acc.to(w_dtype).to(tl.float32)  # the oracle convolves in the weight's dtype
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(out_ptr + ch[:, None] * stride_oc + t[None, :] * stride_ot, y.to(out_ptr.dtype.element_ty), mask=ok)


@torch.library.custom_op("autodeploy::triton_cached_causal_conv1d", mutates_args=("conv_state", "replay_conv"))
def triton_cached_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    conv_state: torch.Tensor,
    replay_conv: torch.Tensor | None,
    slots: torch.Tensor,
    cu_seqlens: torch.Tensor,
    has_state: torch.Tensor,
    replay_lens: torch.Tensor,
    is_verify: torch.Tensor,
) -> torch.Tensor:
    """x: [1, c, T]; weight: [c, k]; conv_state: [slots, c, k-1] (the last k-1 inputs);
    replay_conv: [slots, R, c] input columns of the last verify step (None without speculation).

    Returns [1, c, T] in x's dtype. Metadata: see ``prepare_ssm_metadata``.
    """
    return launch_cached_causal_conv1d(x, weight, bias, activation, conv_state, replay_conv, slots, cu_seqlens,
                                       has_state, replay_lens, is_verify)


def launch_cached_causal_conv1d(x, weight, bias, activation, conv_state, replay_conv, slots, cu_seqlens, has_state,
                                replay_lens, is_verify, skip: torch.Tensor | None = None) -> torch.Tensor:
    """The op's work; lanes where ``skip`` [lanes] is true keep their state and replay buffer
    untouched (their outputs are garbage, for the caller to ignore)."""
    if activation not in ACTIVATIONS or ACTIVATIONS[activation] not in (None, F.silu):  # what the kernel knows
        raise ValueError(f"unsupported conv activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    c, k = weight.shape
    if k < 2:
        raise ValueError(f"conv kernel width must be >= 2, got {k}")
    capacity = 0 if replay_conv is None else replay_conv.shape[1]
    num_lanes, num_tokens = slots.shape[0], x.shape[-1]
    out = torch.empty_like(x)
    if num_lanes == 0:
        return out
    start_state = conv_state.new_empty(num_lanes, c, k - 1)  # each lane's state after its replay
    replay = replay_conv if replay_conv is not None else conv_state  # placeholder, never read
    block_c = min(128, triton.next_power_of_2(c))
    _lane_state_kernel[(num_lanes, triton.cdiv(c, block_c))](
        x[0], weight, conv_state, replay, start_state,
        slots, cu_seqlens, has_state, replay_lens, is_verify, skip.view(torch.uint8) if skip is not None else slots,
        c, capacity,
        *x[0].stride(), *conv_state.stride(), *replay.stride(), *start_state.stride(),
        KM1=k - 1, BLOCK_K=max(2, triton.next_power_of_2(k - 1)), BLOCK_C=block_c, BLOCK_T=16,
        HAS_REPLAY=replay_conv is not None, HAS_SKIP=skip is not None, **pdl_launch(x.device),
    )
    if num_tokens == 0:
        return out

    block_c = min(64, triton.next_power_of_2(c))
    block_t = max(8, min(32, triton.next_power_of_2(num_tokens)))  # shape-only: small tiles for decode steps
    _conv_output_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(c, block_c))](
        x[0], weight, bias if bias is not None else weight, start_state, out[0], cu_seqlens,
        c, num_tokens, num_lanes,
        *x[0].stride(), *out[0].stride(), *weight.stride(), *start_state.stride(),
        KW=k, BLOCK_C=block_c, BLOCK_T=block_t, SEARCH_STEPS=num_lanes.bit_length(),
        HAS_BIAS=bias is not None,
        SILU=ACTIVATIONS[activation] is F.silu, **pdl_launch(x.device),
    )
    return out


@triton_cached_causal_conv1d.register_fake
def _(x, weight, bias, activation, conv_state, replay_conv, slots, cu_seqlens, has_state, replay_lens, is_verify):
    return torch.empty_like(x)
