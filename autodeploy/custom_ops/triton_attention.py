"""Cached attention, Triton backend: ``autodeploy::triton_cached_attention``.

Same signature and semantics as ``autodeploy::torch_cached_attention`` (the oracle), but one kernel
launch attends every lane of the step at once, decode and prefill mixed, instead of a host loop.
Each program takes a block of one lane's queries times the query heads that share one KV head
(GQA/MQA), gathers that lane's keys through ``page_list`` and runs an online softmax in float32
with the causal mask, sliding window, block-local chunks, soft-cap and sinks. The grid comes from tensor shapes and each
program finds its lane from ``cu_seqlens`` itself, so the op never syncs with the host (CUDA-graph
safe) and adds no small torch kernels per layer besides the two KV writes. Decode
steps split each block's keys over several programs and merge their softmax pieces in a second
kernel (split-KV, see ``num_key_splits``).

Needs a GPU to launch, or ``TRITON_INTERPRET=1`` set before this module is imported (CPU tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from autodeploy.custom_ops.triton_kv_write import triton_write_kv
from autodeploy.custom_ops.triton_lanes import lane_lengths, owning_lane
from autodeploy.custom_ops.triton_pdl import pdl_launch, pdl_wait

__all__ = ["triton_cached_attention"]


@triton.jit
def _paged_attention_kernel(
    q_ptr, out_ptr, k_cache_ptr, v_cache_ptr, sinks_ptr,
    cu_seqlens_ptr, kv_start_ptr, kv_len_ptr, page_list_ptr, num_lanes,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_cp, stride_co, stride_ch, stride_cd,
    stride_pl, stride_pp,
    part_acc_ptr, part_m_ptr, part_l_ptr, num_tokens, num_q_heads,
    scale, sliding_window, soft_cap, attention_chunk,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_SOFT_CAP: tl.constexpr, HAS_SINKS: tl.constexpr, DOTS_IN_FP32: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    # Tile rows are (query token, head of the GQA group) pairs: row r = token r // BLOCK_G of this
    # block, query head kv_head * GROUP + r % BLOCK_G. Padded rows/columns are masked everywhere.
    BLOCK_M: tl.constexpr = BLOCK_Q * BLOCK_G
    kv_head = tl.program_id(1)
    # This query block's lane: lane b owns ceil(n_b / BLOCK_Q) consecutive blocks, so the lane is
    # the number of lanes whose blocks all come before this one (blocks past every lane's get the
    # last lane and no rows). Every program derives it from cu_seqlens itself: no per-layer ops.
    block = tl.program_id(0)
    lane_blocks = (lane_lengths(cu_seqlens_ptr, num_lanes, BLOCK_L) + BLOCK_Q - 1) // BLOCK_Q
    lane, blocks_before, _ = owning_lane(lane_blocks, block, num_lanes, BLOCK_L)
    lane_first, lane_end = tl.load(cu_seqlens_ptr + lane), tl.load(cu_seqlens_ptr + lane + 1)
    q_first = tl.minimum(lane_first + (block - blocks_before) * BLOCK_Q, lane_end)  # first token of the block
    kv_start, kv_len = tl.load(kv_start_ptr + lane), tl.load(kv_len_ptr + lane)

    rows = tl.arange(0, BLOCK_M)
    token = q_first + rows // BLOCK_G
    head = kv_head * GROUP + rows % BLOCK_G
    row_ok = (token < lane_end) & (rows % BLOCK_G < GROUP)
    pos = kv_len - (lane_end - lane_first) + (token - lane_first)  # absolute position per row
    lo_row = kv_start + tl.zeros_like(pos)  # first key each row may see
    if sliding_window > 0:
        lo_row = tl.maximum(lo_row, pos - sliding_window + 1)
    if attention_chunk > 0:  # block-local: from the start of the row's own block
        lo_row = tl.maximum(lo_row, pos - pos % attention_chunk)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM

    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if DOTS_IN_FP32:
        q = q.to(tl.float32)  # K, V and P follow q's dtype into the dots

    # The sink is one extra logit with a zero value vector: start the running softmax from it.
    split = tl.program_id(2)
    if HAS_SINKS:  # counted once: by the first split
        sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32)
        m_i = tl.where(split == 0, sink, -1.0e30)
        l_i = tl.where(split == 0, 1.0, 0.0) + tl.zeros([BLOCK_M], tl.float32)
    else:
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: fully masked rows stay NaN-free
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Key range of the whole block: from the lowest row's window start to the last valid row.
    n_valid = tl.minimum(lane_end - q_first, BLOCK_Q)
    key_lo = tl.min(tl.where(row_ok, lo_row, kv_len), axis=0)
    key_hi = tl.where(n_valid > 0, kv_len - (lane_end - q_first) + n_valid, key_lo)
    if NUM_SPLITS > 1:  # this program's share of the keys: a run of 16-key multiples
        span = tl.cdiv(tl.maximum(key_hi - key_lo, 0), NUM_SPLITS * 16) * 16
        key_lo = key_lo + split * span
        key_hi = tl.minimum(key_hi, key_lo + span)
    first_page = kv_start // PAGE_SIZE
    for block_start in range(key_lo, key_hi, BLOCK_N):
        keys = block_start + tl.arange(0, BLOCK_N)
        key_ok = keys < key_hi
        logical_page = keys // PAGE_SIZE - first_page  # column of page_list
        page = tl.load(page_list_ptr + lane * stride_pl + logical_page * stride_pp, mask=key_ok, other=0)
        row_in_cache = page * stride_cp + (keys % PAGE_SIZE) * stride_co + kv_head * stride_ch
        kv_offsets = row_in_cache[:, None] + dims[None, :] * stride_cd
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(q.dtype)

        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        if HAS_SOFT_CAP:
            s = (2.0 * tl.sigmoid(2.0 * s / soft_cap) - 1.0) * soft_cap  # tanh(s / c) * c
        allowed = (keys[None, :] >= lo_row[:, None]) & (keys[None, :] <= pos[:, None]) & row_ok[:, None]
        s = tl.where(allowed & key_ok[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    else:  # unnormalized partial results, merged by _combine_splits_kernel
        row = (split * num_tokens + token) * num_q_heads + head  # [splits, T, hq] layout
        tl.store(part_m_ptr + row, m_i, mask=row_ok)
        tl.store(part_l_ptr + row, l_i, mask=row_ok)
        tl.store(part_acc_ptr + row[:, None] * BLOCK_D + dims[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _combine_splits_kernel(part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, num_tokens, num_q_heads,
                           stride_ot, stride_oh, stride_od,
                           HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                           BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    """One (token, query head): the splits' softmax pieces rescaled to their common maximum."""
    pdl_wait(PDL)
    token, head = tl.program_id(0), tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < NUM_SPLITS
    row = (splits * num_tokens + token) * num_q_heads + head
    m = tl.load(part_m_ptr + row, mask=split_ok, other=-1.0e30)
    l_ = tl.load(part_l_ptr + row, mask=split_ok, other=0.0)
    weight = tl.exp(m - tl.max(m, axis=0))
    total = tl.sum(l_ * weight, axis=0)
    dims = tl.arange(0, BLOCK_D)
    acc = tl.load(part_acc_ptr + row[:, None] * BLOCK_D + dims[None, :], mask=split_ok[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


# Triton's interpreter (3.9) multiplies bfloat16 tl.dot operands as their raw uint16 bits, so under
# TRITON_INTERPRET the kernel runs its dots in float32 for bf16 inputs; compiled kernels use bf16.
_INTERPRETED = not isinstance(_paged_attention_kernel, JITFunction)


@torch.library.custom_op("autodeploy::triton_cached_attention", mutates_args=("k_cache", "v_cache"))
def triton_cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_idx: torch.Tensor,
    kv_start: torch.Tensor,
    kv_len: torch.Tensor,
    page_list: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    sliding_window: int,
    soft_cap: float,
    sinks: torch.Tensor | None,
    attention_chunk: int = 0,
) -> torch.Tensor:
    """q: [1, T, hq, d]; k, v: [1, T, hkv, d]; k_cache, v_cache: [pages, page_size, hkv, d].

    Returns [1, T, hq, d]. Metadata shapes: see ``prepare_attention_metadata``.
    """
    page_size, hkv, d = k_cache.shape[1:]
    triton_write_kv(k, v, k_cache, v_cache, write_idx)
    num_tokens, hq = q.shape[1], q.shape[2]
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    group = hq // hkv
    block_g = triton.next_power_of_2(group)
    # Tile rows = BLOCK_Q tokens x BLOCK_G heads; at least 16 rows for tl.dot. Small tiles when the
    # step is (mostly) decode, larger ones when lanes carry many tokens: a shape-only heuristic.
    rows = 16 if num_tokens <= page_list.shape[0] else 64
    block_q = max(1, rows // block_g)

    # Query blocks never straddle lanes: lane b owns ceil(n_b / BLOCK_Q) blocks, and all lanes
    # together own at most T // BLOCK_Q + B, the (shape-only) grid size. Extra blocks get 0 rows.
    num_lanes = cu_seqlens.shape[0] - 1
    grid_blocks = num_tokens // block_q + num_lanes

    block_d = max(16, triton.next_power_of_2(d))
    splits = num_key_splits(num_tokens, page_list.shape[0], page_list.shape[1] * page_size)
    if splits > 1:  # float32 partial results, [splits, T, hq] rows
        part_acc = torch.empty(splits * num_tokens * hq, block_d, dtype=torch.float32, device=q.device)
        part_m, part_l = (torch.empty(splits * num_tokens * hq, dtype=torch.float32, device=q.device) for _ in "ml")
    else:
        part_acc = part_m = part_l = out
    _paged_attention_kernel[(grid_blocks, hkv, splits)](
        q[0], out[0], k_cache, v_cache, sinks if sinks is not None else q,
        cu_seqlens, kv_start, kv_len, page_list, num_lanes,
        *q[0].stride(), *out[0].stride(), *k_cache.stride(), *page_list.stride(),
        part_acc, part_m, part_l, num_tokens, hq,
        scale, sliding_window, soft_cap, attention_chunk,
        HEAD_DIM=d, PAGE_SIZE=page_size, GROUP=group, BLOCK_G=block_g, BLOCK_Q=block_q,
        BLOCK_N=64 if d <= 128 else 32,  # keys map to pages one by one: a block may span pages
        BLOCK_D=block_d, BLOCK_L=max(2, triton.next_power_of_2(num_lanes)),
        HAS_SOFT_CAP=soft_cap > 0, HAS_SINKS=sinks is not None,
        DOTS_IN_FP32=_INTERPRETED and q.dtype == torch.bfloat16, NUM_SPLITS=splits, **pdl_launch(q.device),
    )
    if splits > 1:
        _combine_splits_kernel[(num_tokens, hq)](
            part_acc, part_m, part_l, out[0], num_tokens, hq, *out[0].stride(),
            HEAD_DIM=d, NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
            **pdl_launch(q.device))
    return out


# Split-KV ("flash decoding"): a decode step has one query row block per lane and KV head, too few
# programs to fill the GPU, each walking every key of its lane; splitting the keys of each block
# over NUM_SPLITS programs and merging their softmax pieces restores the parallelism. Decided from
# shapes only (the step's token count against its lanes, the page list's key capacity), so a
# captured graph keeps its split.
SPLIT_MIN_KEYS = 512  # lanes that can hold fewer keys are not split
KEYS_PER_SPLIT = 256
MAX_SPLITS = 16


def num_key_splits(num_tokens: int, num_lanes: int, max_keys: int) -> int:
    """How many programs share the keys of one query block: > 1 only for decode-like steps (at
    most one token per lane on average) whose lanes can hold at least SPLIT_MIN_KEYS keys."""
    if num_tokens > num_lanes or max_keys < SPLIT_MIN_KEYS:
        return 1
    return max(1, min(MAX_SPLITS, -(-max_keys // KEYS_PER_SPLIT)))


@triton_cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, write_idx, kv_start, kv_len, page_list, cu_seqlens, scale,
      sliding_window, soft_cap, sinks, attention_chunk=0):
    return torch.empty_like(q)
