"""A Mamba2 mixer's cached middle in one kernel: ``autodeploy::triton_cached_mamba_mixer``.

Between its in_proj and out_proj GEMMs a Mamba2 mixer runs the cached causal conv (two launches),
the cached SSD scan, a cast and the gated RMSNorm (which copies its strided gate first): six or
more kernels per layer, nearly all launch latency at small batches. This op computes the same
thing, ``rms_norm(ssd_scan(split(conv(xBC))) , gate)``, with one launch for the short lanes:

* one program per (lane with tokens, head, block of head_dim rows), up to ``min(lanes, tokens)``
  lanes (a step's token count bounds its lanes with tokens, so a batch-1 step launches programs for
  one lane, not for every lane of the batch);
* the program rolls its conv channels' state (its own x channels, and its group's B and C
  channels), convolves (+ bias, SiLU), discretizes dt (bias, softplus, clamps), updates its
  [BLOCK_P, d_state] float32 SSM state slice in registers, and computes y = C state + D x and
  y * silu(z) token by token;
* the gated norm spans a group of heads (NemotronH, Mamba2, Bamba: the channels of one SSM group),
  which several programs share: each program writes its gated values and their partial sum of
  squares to scratch, then counts itself done on a per-(lane, group) counter (an atomic add, which
  orders its earlier reads and writes before it); the program that completes the count normalizes
  the group's rows, and writes the group's B and C conv state (no other program still reads it).

Counters start at zero: the graph computes one zeroed buffer per step for all fused layers
(``autodeploy::mamba_mixer_counters``, one memset per step, not one per layer), and the program
that completes a count sets it back to zero, so the op leaves the buffer as it found it.

Which lanes the kernel serves: lanes of 1 to M - 1 tokens that neither verify drafts nor replay
them (decode lanes, short prefill chunks, the padding lane of a captured graph; with no replay
buffers, i.e. speculation off, every lane with fewer tokens), where M = max(CHUNKED_MIN_TOKENS,
lanes) is a shape fact. Every other lane (prefill chunks of M tokens or more, verify lanes,
replays) goes through the existing kernels, unchanged (``triton_cached_causal_conv1d``,
``triton_cached_ssd_scan``, the gated ``rms_norm``), told to skip the fused kernel's lanes by a
per-lane mask computed on the device. Those launches are made only when the step's shape allows
such a lane: the step has at least M tokens, or speculation is on (replay buffers exist). A decode
step carries at most one token per lane, fewer than the lanes (one lane is the padding lane), so
without speculation every decode step, at any batch size, and every step of fewer than M tokens is
exactly one launch per layer, with no host sync. M grows with the lanes for that reason; the price
is that a prefill chunk of CHUNKED_MIN_TOKENS to lanes - 1 tokens runs token by token here rather
than in the scan's chunked form (same results to float rounding; slower for that chunk only). A
bigger or speculative step pays the existing path's launches (whose programs exit at once for the
fused lanes) plus this one. The split is decided per lane on the device, so a captured graph
serves any step of its size.

Numerics follow the unfused chain (the oracle: ``torch_cached_causal_conv1d``,
``torch_cached_ssd_scan``, ``rms_norm_reference``): conv in float32 rounded to the weight's dtype
before the activation and to x's dtype after; dt rounded as ``discretize_dt`` does; y rounded to
x's dtype, then to the norm input's dtype; the norm in float32 in transformers' order of casts.
Malformed metadata outside the contract (verify or replay without replay buffers) cannot be raised
from a kernel: those lanes are served as plain lanes, and checked mode names them.

Needs a GPU to launch, or ``TRITON_INTERPRET=1`` set before this module is imported (CPU tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from autodeploy.custom_ops import triton_ssd_scan
from autodeploy.custom_ops.causal_conv1d import ACTIVATIONS
from autodeploy.custom_ops.triton_causal_conv1d import launch_cached_causal_conv1d
from autodeploy.custom_ops.triton_lanes import lane_lengths, owning_lane
from autodeploy.custom_ops.triton_ssd_scan import _head_params

__all__ = ["triton_cached_mamba_mixer", "mamba_mixer_counters", "fused_lane_mask", "max_fused_tokens"]

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_NUM_WARPS = 4


@triton.jit
def _round_to(v, CODE: tl.constexpr):
    """float32 ``v`` rounded to nearest (ties to even) in dtype CODE (0 float32, 1 bfloat16, 2
    float16), as float32; bfloat16 on the bits, as ``triton_ssd_scan._round_like`` explains."""
    if CODE == 1:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    elif CODE == 2:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def _lane_is_fused(n, verify, replay, max_tokens, HAS_REPLAY: tl.constexpr):
    """The fused kernel's lanes: 1 .. max_tokens - 1 tokens, and (with replay buffers) neither
    verifying nor replaying."""
    mine = (n >= 1) & (n < max_tokens)
    if HAS_REPLAY:
        mine = mine & ~verify & (replay == 0)
    return mine


@triton.jit
def _fused_lane_mask_kernel(cu_seqlens_ptr, is_verify_ptr, replay_lens_ptr, mask_ptr, num_lanes, max_tokens,
                            HAS_REPLAY: tl.constexpr, BLOCK_L: tl.constexpr):
    lanes = tl.arange(0, BLOCK_L)
    ok = lanes < num_lanes
    n = lane_lengths(cu_seqlens_ptr, num_lanes, BLOCK_L)
    verify = tl.load(is_verify_ptr + lanes, mask=ok, other=0) != 0
    replay = tl.load(replay_lens_ptr + lanes, mask=ok, other=0)
    tl.store(mask_ptr + lanes, _lane_is_fused(n, verify, replay, max_tokens, HAS_REPLAY).to(tl.uint8), mask=ok)


@triton.jit
def _conv_setup(xbc_ptr, conv_state_ptr, w_ptr, b_ptr, slot, ch, offs, limit, state_limit,
                stride_xc, stride_ss, stride_sc, stride_wc, stride_wk,
                KW: tl.constexpr, BLOCK_KW: tl.constexpr, HAS_BIAS: tl.constexpr):
    """What every token's conv of channels ``ch`` (valid where offs < limit) reuses: taps
    [channels, BLOCK_KW] and bias in float32, the channels' row pointers into the inputs and the
    slot's state, and the masks of valid taps (and of state rows: none for a new sequence)."""
    taps = tl.arange(0, BLOCK_KW)
    ok = (offs < limit)[:, None] & (taps < KW)[None, :]
    w = tl.load(w_ptr + ch[:, None] * stride_wc + taps[None, :] * stride_wk, mask=ok, other=0.0).to(tl.float32)
    bias = tl.zeros(offs.shape, tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + ch, mask=offs < limit, other=0.0).to(tl.float32)
    rows_in = xbc_ptr + ch[:, None] * stride_xc
    rows_state = conv_state_ptr + slot * stride_ss + ch[:, None] * stride_sc
    return w, bias, rows_in, rows_state, ok, ok & (offs < state_limit)[:, None]


@triton.jit
def _conv_token(w, bias, rows_in, rows_state, ok, state_ok, start, i, stride_xt, stride_sk,
                KW: tl.constexpr, BLOCK_KW: tl.constexpr, SILU: tl.constexpr, W_CODE: tl.constexpr,
                X_CODE: tl.constexpr):
    """Conv output of the lane's token ``i`` (``_conv_setup``'s channels): window columns at lane
    positions i-k+1 .. i, those before the lane's first token from the slot's state (zeros for a
    new sequence); rounded as the oracle rounds it (the weight's dtype before the activation, x's
    dtype after), as float32."""
    q = i + tl.arange(0, BLOCK_KW) - (KW - 1)
    from_state = (q < 0)[None, :]
    col = tl.load(rows_state + (tl.minimum(tl.maximum(KW - 1 + q, 0), KW - 2) * stride_sk)[None, :],
                  mask=state_ok & from_state, other=0.0)
    inp = tl.load(rows_in + ((start + tl.maximum(q, 0)) * stride_xt)[None, :], mask=ok & ~from_state, other=0.0)
    window = tl.where(from_state, col.to(tl.float32), inp.to(tl.float32))
    if W_CODE != 0:
        window = _round_to(window, W_CODE)
    y = tl.sum(w * window, axis=1) + bias
    if W_CODE != 0:
        y = _round_to(y, W_CODE)
    if SILU:
        y = y * tl.sigmoid(y)
    if X_CODE != 0:
        y = _round_to(y, X_CODE)
    return y


@triton.jit
def _dt_value(raw, bias, dt_min, dt_max, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
              DT_CODE: tl.constexpr):
    """``triton_ssd_scan._discretize_dt`` with the dtype as a code (no rounding calls for float32)."""
    v = raw.to(tl.float32)
    if HAS_DT_BIAS:
        b = bias.to(tl.float32)
        if DT_CODE != 0:
            b = _round_to(b, DT_CODE)
        v = v + b
        if DT_CODE != 0:
            v = _round_to(v, DT_CODE)
    if DT_SOFTPLUS:
        u = tl.exp(-tl.abs(v))
        w = 1.0 + u
        log1p = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
        v = tl.where(v > 20.0, v, tl.maximum(v, 0.0) + log1p)
        if DT_CODE != 0:
            v = _round_to(v, DT_CODE)
    v = tl.minimum(tl.maximum(v, dt_min), dt_max)
    if DT_CODE != 0:
        v = _round_to(v, DT_CODE)
    return v


@triton.jit
def _roll_conv_state(xbc_ptr, conv_state_ptr, slot, start, n, ch, offs, limit, state_limit,
                     stride_xc, stride_xt, stride_ss, stride_sc, stride_sk,
                     KM1: tl.constexpr, BLOCK_K: tl.constexpr):
    """Write the slot's new conv state for channels ``ch``: the last k-1 columns of [state, the
    lane's n tokens], through the weight's dtype (the state's) like the oracle's window."""
    cols = tl.arange(0, BLOCK_K)
    q = n - KM1 + cols  # lane position of each new state column
    from_state = q < 0
    c_ok = (offs < limit)[:, None] & (cols < KM1)[None, :]
    old = tl.load(conv_state_ptr + slot * stride_ss + ch[:, None] * stride_sc
                  + tl.minimum(tl.maximum(KM1 + q, 0), KM1 - 1)[None, :] * stride_sk,
                  mask=c_ok & from_state[None, :] & (offs < state_limit)[:, None], other=0.0)
    inp = tl.load(xbc_ptr + ch[:, None] * stride_xc + (start + tl.maximum(q, 0))[None, :] * stride_xt,
                  mask=c_ok & ~from_state[None, :], other=0.0)
    new = tl.where(from_state[None, :], old, inp.to(conv_state_ptr.dtype.element_ty))
    tl.debug_barrier()  # every read of the old columns precedes the writes below
    tl.store(conv_state_ptr + slot * stride_ss + ch[:, None] * stride_sc + cols[None, :] * stride_sk, new, mask=c_ok)


@triton.jit
def _mamba_mixer_kernel(
    xbc_ptr, dt_ptr, gate_ptr, w_ptr, b_ptr, A_ptr, D_ptr, dt_bias_ptr, norm_w_ptr, out_ptr,
    conv_state_ptr, ssm_state_ptr, gated_ptr, sumsq_ptr, counter_ptr,
    slots_ptr, cu_seqlens_ptr, has_state_ptr, replay_lens_ptr, is_verify_ptr,
    num_lanes, max_tokens, dt_min, dt_max, eps, weight_offset,
    stride_xc, stride_xt, stride_dtt, stride_dth, stride_gt, stride_gc, stride_wc, stride_wk,
    stride_ss, stride_sc, stride_sk,
    stride_ms, stride_mh, stride_mp, stride_mn,
    H: tl.constexpr, P: tl.constexpr, G: tl.constexpr, N: tl.constexpr, KW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KW: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_GC: tl.constexpr, BLOCK_GP: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr, HAS_REPLAY: tl.constexpr,
    NORM_IN: tl.constexpr, PRODUCT: tl.constexpr, OUT: tl.constexpr, CAST_FIRST: tl.constexpr,
    W_CODE: tl.constexpr, X_CODE: tl.constexpr, DT_CODE: tl.constexpr,
):
    item = tl.program_id(0)  # the item-th lane with tokens
    head = tl.program_id(1)
    pb = tl.program_id(2)
    lens = lane_lengths(cu_seqlens_ptr, num_lanes, BLOCK_L)
    lane, first, count = owning_lane((lens > 0).to(tl.int32), item, num_lanes, BLOCK_L)
    start = tl.load(cu_seqlens_ptr + lane)
    n = tl.load(cu_seqlens_ptr + lane + 1) - start
    verify = tl.load(is_verify_ptr + lane) != 0
    replay = tl.load(replay_lens_ptr + lane)
    if (item - first >= count) | ~_lane_is_fused(n, verify, replay, max_tokens, HAS_REPLAY):
        return
    slot = tl.load(slots_ptr + lane).to(tl.int64)
    HPG: tl.constexpr = H // G
    PBLOCKS: tl.constexpr = (P + BLOCK_P - 1) // BLOCK_P
    GROUP_CH: tl.constexpr = HPG * P  # norm group = SSM group
    group = head // HPG
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    p_ok, n_ok = offs_p < P, offs_n < N
    x_ch = head * P + offs_p
    b_ch = H * P + group * N + offs_n
    c_ch = H * P + G * N + group * N + offs_n
    continues = tl.load(has_state_ptr + lane) != 0
    p_state = tl.where(continues, P, 0)  # row limits: a new sequence starts from zeros
    n_state = tl.where(continues, N, 0)

    state_ptrs = (ssm_state_ptr + slot * stride_ms + head * stride_mh
                  + offs_p[:, None] * stride_mp + offs_n[None, :] * stride_mn)
    state = tl.load(state_ptrs, mask=(offs_p < p_state)[:, None] & n_ok[None, :], other=0.0)
    A, D, dtb = _head_params(A_ptr, D_ptr, dt_bias_ptr, head, HAS_D, HAS_DT_BIAS)
    # (constexprs are passed one by one: a tuple of them loses constexpr-ness when compiled)
    conv = (stride_xc, stride_ss, stride_sc, stride_wc, stride_wk)
    wx, bx, in_x, st_x, ok_x, sok_x = _conv_setup(xbc_ptr, conv_state_ptr, w_ptr, b_ptr, slot, x_ch, offs_p, P,
                                                  p_state, *conv, KW, BLOCK_KW, HAS_BIAS)
    wb, bb, in_b, st_b, ok_b, sok_b = _conv_setup(xbc_ptr, conv_state_ptr, w_ptr, b_ptr, slot, b_ch, offs_n, N,
                                                  n_state, *conv, KW, BLOCK_KW, HAS_BIAS)
    wc, bc, in_c, st_c, ok_c, sok_c = _conv_setup(xbc_ptr, conv_state_ptr, w_ptr, b_ptr, slot, c_ch, offs_n, N,
                                                  n_state, *conv, KW, BLOCK_KW, HAS_BIAS)

    for i in range(0, n):
        t = start + i
        xv = _conv_token(wx, bx, in_x, st_x, ok_x, sok_x, start, i, stride_xt, stride_sk,
                         KW, BLOCK_KW, SILU, W_CODE, X_CODE)
        Bv = _conv_token(wb, bb, in_b, st_b, ok_b, sok_b, start, i, stride_xt, stride_sk,
                         KW, BLOCK_KW, SILU, W_CODE, X_CODE)
        Cv = _conv_token(wc, bc, in_c, st_c, ok_c, sok_c, start, i, stride_xt, stride_sk,
                         KW, BLOCK_KW, SILU, W_CODE, X_CODE)
        dtv = _dt_value(tl.load(dt_ptr + t * stride_dtt + head * stride_dth), dtb, dt_min, dt_max,
                        HAS_DT_BIAS, DT_SOFTPLUS, DT_CODE)
        state = state * tl.exp(dtv * A) + (dtv * xv)[:, None] * Bv[None, :]
        yv = tl.sum(state * Cv[None, :], axis=1)
        if HAS_D:
            yv += D * xv
        if X_CODE != 0:  # the scan's output dtype
            yv = _round_to(yv, X_CODE)
        if NORM_IN != X_CODE:  # then the norm input's
            yv = _round_to(yv, NORM_IN)
        z = tl.load(gate_ptr + t * stride_gt + x_ch * stride_gc, mask=p_ok, other=0.0).to(tl.float32)
        gated = tl.where(p_ok, yv * (z / (1.0 + tl.exp(-z))), 0.0)
        tl.store(gated_ptr + t * (H * P) + x_ch, gated, mask=p_ok)
        tl.store(sumsq_ptr + t * (H * PBLOCKS) + head * PBLOCKS + pb, tl.sum(gated * gated, axis=0))

    # this program's own state: the SSM slice and its x channels' conv columns
    tl.store(state_ptrs, state, mask=p_ok[:, None] & n_ok[None, :])
    _roll_conv_state(xbc_ptr, conv_state_ptr, slot, start, n, x_ch, offs_p, P, p_state,
                     stride_xc, stride_xt, stride_ss, stride_sc, stride_sk, KW - 1, BLOCK_K)

    # the group's last program to finish: the shared B/C conv columns and the norm of every token
    # every thread's reads and writes above precede the count (a scalar atomic is issued by one
    # thread; the barrier, then its release at GPU scope, publish the whole program's work)
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr + item * G + group, 1, sem="acq_rel", scope="gpu")
    if done == HPG * PBLOCKS - 1:
        tl.store(counter_ptr + item * G + group, 0)  # every program of the group has counted: back to zero
        _roll_conv_state(xbc_ptr, conv_state_ptr, slot, start, n, b_ch, offs_n, N, n_state,
                         stride_xc, stride_xt, stride_ss, stride_sc, stride_sk, KW - 1, BLOCK_K)
        _roll_conv_state(xbc_ptr, conv_state_ptr, slot, start, n, c_ch, offs_n, N, n_state,
                         stride_xc, stride_xt, stride_ss, stride_sc, stride_sk, KW - 1, BLOCK_K)
        offs_g = tl.arange(0, BLOCK_GC)
        g_ok = offs_g < GROUP_CH
        ch = group * GROUP_CH + offs_g
        w = tl.load(norm_w_ptr + ch, mask=g_ok, other=0.0).to(tl.float32)
        offs_s = tl.arange(0, BLOCK_GP)
        for i in range(0, n):
            t = start + i
            parts = tl.load(sumsq_ptr + t * (H * PBLOCKS) + group * (HPG * PBLOCKS) + offs_s,
                            mask=offs_s < HPG * PBLOCKS, other=0.0, cache_modifier=".cg")
            rstd = tl.rsqrt(tl.sum(parts, axis=0) / GROUP_CH + eps)
            y = tl.load(gated_ptr + t * (H * P) + ch, mask=g_ok, other=0.0, cache_modifier=".cg") * rstd
            if CAST_FIRST:  # weight * y.to(x.dtype)
                o = _round_to(w * _round_to(y, NORM_IN), PRODUCT)
            else:  # y * (weight.float() + offset)
                o = y * (w + weight_offset)
            tl.store(out_ptr + t * (H * P) + ch, _round_to(o, OUT).to(out_ptr.dtype.element_ty), mask=g_ok)


def _block_p(items: int, h: int, p: int, device: torch.device) -> int:
    """head_dim rows per program: 16 (a [16, d_state] float32 state slice per program, 16-byte
    loads along d_state), or 8 where that leaves fewer than two programs per SM (batch 1 on an
    H200: 64 heads x 4 blocks = 256 programs for 132 SMs; 512 with 8). The interpreter runs
    programs one after another: there, one block spans the head."""
    if device.type != "cuda":
        return triton.next_power_of_2(p)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return 16 if items * h * triton.cdiv(p, 16) >= 2 * sms else 8


def max_fused_tokens(lanes: int) -> int:
    """M: the fused kernel serves lanes of fewer tokens (see the module docstring)."""
    return max(triton_ssd_scan.CHUNKED_MIN_TOKENS, lanes)


def fused_lane_mask(cu_seqlens, is_verify, replay_lens, has_replay: bool) -> torch.Tensor:
    """[lanes] bool: the lanes the fused kernel serves (see the module docstring), on the device."""
    lanes = cu_seqlens.shape[0] - 1
    mask = torch.empty(lanes, dtype=torch.uint8, device=cu_seqlens.device)
    if lanes:
        _fused_lane_mask_kernel[(1,)](cu_seqlens, _as_u8(is_verify), replay_lens, mask, lanes,
                                      max_fused_tokens(lanes), HAS_REPLAY=has_replay,
                                      BLOCK_L=triton.next_power_of_2(lanes))
    return mask.view(torch.bool)


def _as_u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bool else t


@torch.library.custom_op("autodeploy::mamba_mixer_counters", mutates_args=())
def mamba_mixer_counters(input_ids: torch.Tensor, layers: int, groups: int) -> torch.Tensor:
    """Zeroed [layers, T, groups] int32 completion counters for the fused mixers of one step (layer
    i reads ``counters[i]``), one allocation and memset per step."""
    return torch.zeros(layers, input_ids.shape[-1], groups, dtype=torch.int32, device=input_ids.device)


@mamba_mixer_counters.register_fake
def _(input_ids, layers, groups):
    return input_ids.new_empty((layers, input_ids.shape[-1], groups), dtype=torch.int32)


@torch.library.custom_op("autodeploy::triton_cached_mamba_mixer",
                         mutates_args=("conv_state", "replay_conv", "ssm_state", "replay_x", "replay_dt", "replay_B",
                                       "counters"))
def triton_cached_mamba_mixer(
    xBC: torch.Tensor, dt: torch.Tensor, gate: torch.Tensor,
    conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, activation: str,
    A: torch.Tensor, D: torch.Tensor | None, dt_bias: torch.Tensor | None, norm_weight: torch.Tensor,
    conv_state: torch.Tensor, replay_conv: torch.Tensor | None, ssm_state: torch.Tensor,
    replay_x: torch.Tensor | None, replay_dt: torch.Tensor | None, replay_B: torch.Tensor | None,
    slots: torch.Tensor, cu_seqlens: torch.Tensor, has_state: torch.Tensor, replay_lens: torch.Tensor,
    is_verify: torch.Tensor, counters: torch.Tensor, layer: int,
    num_heads: int, head_dim: int, n_groups: int, d_state: int,
    dt_softplus: bool, dt_min: float, dt_max: float, chunk_size: int,
    norm_in_dtype: torch.dtype, eps: float, weight_offset: float, cast_first: bool, out_dtype: torch.dtype,
) -> torch.Tensor:
    """The cached conv, SSD scan and gated RMSNorm of a Mamba2 mixer (see the module docstring).

    xBC: [1, c, T] the conv's input (c = h*p + 2*g*n: x, B, C channels); dt: [1, T, h]; gate: [1, T, h*p];
    conv_state [slots, c, k-1], ssm_state [slots, h, p, n] float32 and the replay buffers as the
    cached conv and scan take them; counters: ``mamba_mixer_counters``' buffer, row ``layer``.
    The norm is over each SSM group's h/g * p channels (eps, weight_offset, cast_first, out_dtype
    as ``rms_norm``), of y rounded to x's dtype and then to ``norm_in_dtype``.
    Returns [1, T, h*p] in ``out_dtype``.
    """
    h, p, g, n = num_heads, head_dim, n_groups, d_state
    c, k = conv_weight.shape
    num_tokens = xBC.shape[-1]
    if k < 2:
        raise ValueError(f"conv kernel width must be >= 2, got {k}")
    if c != h * p + 2 * g * n or h % g:
        raise ValueError(f"mamba mixer: {c} conv channels != h*p + 2*g*n = {h}*{p} + 2*{g}*{n}, or {h} heads "
                         f"not a multiple of {g} groups")
    if activation not in ACTIVATIONS or ACTIVATIONS[activation] not in (None, F.silu):
        raise ValueError(f"unsupported conv activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    for name, dtype in (("norm_in_dtype", norm_in_dtype), ("out_dtype", out_dtype), ("x", xBC.dtype),
                        ("dt", dt.dtype), ("conv weight", conv_weight.dtype)):
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"mamba mixer: {name} {dtype} unsupported; known: {sorted(map(str, _DTYPE_CODES))}")
    lanes = slots.shape[0]
    has_replay = replay_x is not None
    out = xBC.new_empty((1, num_tokens, h * p), dtype=out_dtype)
    if num_tokens == 0 and not has_replay or lanes == 0:
        return out
    max_tokens = max_fused_tokens(lanes)
    if num_tokens >= max_tokens or has_replay:  # a lane the fused kernel leaves may exist: the existing path
        skip = fused_lane_mask(cu_seqlens, is_verify, replay_lens, has_replay)
        meta = (slots, cu_seqlens, has_state, replay_lens, is_verify)
        conv_out = launch_cached_causal_conv1d(xBC, conv_weight, conv_bias, activation, conv_state, replay_conv,
                                               *meta, skip=skip)
        x, B, C = conv_out.transpose(1, 2).split([h * p, g * n, g * n], dim=-1)
        y = triton_ssd_scan.launch_cached_ssd_scan(
            x.view(1, num_tokens, h, p), dt, A, B.view(1, num_tokens, g, n), C.view(1, num_tokens, g, n), D, dt_bias,
            ssm_state, replay_x, replay_dt, replay_B, *meta, dt_softplus, dt_min, dt_max, chunk_size, skip=skip)
        out = torch.ops.autodeploy.rms_norm(y.to(norm_in_dtype).view(1, num_tokens, h * p), norm_weight, gate, eps,
                                            (h // g) * p, weight_offset, cast_first, out_dtype)
    if num_tokens == 0:
        return out
    items = min(lanes, num_tokens)
    block_p = _block_p(items, h, p, xBC.device)
    pblocks = triton.cdiv(p, block_p)
    gated = torch.empty(num_tokens, h * p, dtype=torch.float32, device=xBC.device)
    sumsq = torch.empty(num_tokens, h * pblocks, dtype=torch.float32, device=xBC.device)
    gate2 = gate[0]
    product = torch.promote_types(norm_weight.dtype, norm_in_dtype)
    _mamba_mixer_kernel[(items, h, pblocks)](
        xBC[0], dt[0], gate2, conv_weight, conv_bias if conv_bias is not None else conv_weight, A,
        D if D is not None else A, dt_bias if dt_bias is not None else A, norm_weight, out[0],
        conv_state, ssm_state, gated, sumsq, counters[layer],
        slots, cu_seqlens, _as_u8(has_state), replay_lens, _as_u8(is_verify),
        lanes, max_tokens, float(dt_min), float(dt_max), float(eps), float(weight_offset),
        *xBC[0].stride(), *dt[0].stride(), *gate2.stride(), *conv_weight.stride(),
        *conv_state.stride(), *ssm_state.stride(),
        H=h, P=p, G=g, N=n, KW=k,
        BLOCK_P=block_p, BLOCK_N=triton.next_power_of_2(n), BLOCK_K=max(2, triton.next_power_of_2(k - 1)),
        BLOCK_KW=triton.next_power_of_2(k),
        BLOCK_L=triton.next_power_of_2(lanes), BLOCK_GC=triton.next_power_of_2((h // g) * p),
        BLOCK_GP=max(2, triton.next_power_of_2((h // g) * pblocks)),
        HAS_BIAS=conv_bias is not None, SILU=ACTIVATIONS[activation] is F.silu, HAS_D=D is not None,
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=bool(dt_softplus), HAS_REPLAY=has_replay,
        NORM_IN=_DTYPE_CODES[norm_in_dtype], PRODUCT=_DTYPE_CODES.get(product, 0), OUT=_DTYPE_CODES[out_dtype],
        CAST_FIRST=bool(cast_first), W_CODE=_DTYPE_CODES[conv_weight.dtype], X_CODE=_DTYPE_CODES[xBC.dtype],
        DT_CODE=_DTYPE_CODES[dt.dtype], num_warps=_NUM_WARPS,
    )
    return out


@triton_cached_mamba_mixer.register_fake
def _(xBC, dt, gate, conv_weight, conv_bias, activation, A, D, dt_bias, norm_weight, conv_state, replay_conv,
      ssm_state, replay_x, replay_dt, replay_B, slots, cu_seqlens, has_state, replay_lens, is_verify, counters, layer,
      num_heads, head_dim, n_groups, d_state, dt_softplus, dt_min, dt_max, chunk_size, norm_in_dtype, eps,
      weight_offset, cast_first, out_dtype):
    return xBC.new_empty((1, xBC.shape[-1], num_heads * head_dim), dtype=out_dtype)
