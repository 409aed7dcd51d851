"""Triton kernels for ``autodeploy::prepare_attention_metadata`` and ``prepare_ssm_metadata`` on
the GPU: one launch each instead of the ~20 and ~8 small torch ops of the reference (at small
batch a decode step's cost is its kernel count). Same outputs, bit for bit: int64 arithmetic on
the raw lane facts.

The attention kernel's programs each take a block of tokens: every program sums the lane lengths
itself (a [lanes] cumsum), finds each token's lane by counting the lane ends at or before it, and
writes the token's cache row; program 0 also writes the per-lane outputs (cu_seqlens, kv_start,
kv_len and the page list).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autodeploy.custom_ops.triton_pdl import pdl_launch, pdl_wait

__all__ = ["triton_prepare_attention_metadata", "triton_prepare_ssm_metadata"]


@triton.jit
def _attention_metadata_kernel(
    seq_lens_ptr, cached_ptr, slots_ptr, table_ptr, write_ptr, kv_start_ptr, kv_len_ptr, pages_ptr, cu_ptr,
    num_tokens, num_lanes, table_width, table_stride_lane, table_stride_page, page_size, window, ring_pages,
    pages_width, attention_chunk, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    lanes = tl.arange(0, BLOCK_L)
    lane_ok = lanes < num_lanes
    lens = tl.load(seq_lens_ptr + lanes, mask=lane_ok, other=0).to(tl.int64)
    ends = tl.cumsum(lens, axis=0)
    starts = ends - lens
    cached = tl.load(cached_ptr + lanes, mask=lane_ok, other=0).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < num_tokens
    # each token's lane: the lanes whose tokens all come before it
    lane = tl.sum(((ends[None, :] <= t[:, None]) & lane_ok[None, :]).to(tl.int32), axis=1)
    lane_ok_t = t_ok & (lane < num_lanes)
    mine = lanes[None, :] == lane[:, None]
    pos = tl.sum(tl.where(mine, cached - starts, 0), axis=1) + t
    logical_page = pos // page_size
    if window <= 0:
        phys = tl.load(table_ptr + lane.to(tl.int64) * table_stride_lane + logical_page * table_stride_page,
                       mask=lane_ok_t, other=0).to(tl.int64)
    else:
        slot = tl.load(slots_ptr + lane, mask=lane_ok_t, other=0).to(tl.int64)
        phys = slot * ring_pages + logical_page % ring_pages
    tl.store(write_ptr + t, phys * page_size + pos % page_size, mask=lane_ok_t)
    if tl.program_id(0) == 0:
        tl.store(cu_ptr + lanes + 1, ends, mask=lane_ok)
        tl.store(cu_ptr + lanes, tl.zeros([BLOCK_L], tl.int64), mask=lanes == 0)
        tl.store(kv_len_ptr + lanes, cached + lens, mask=lane_ok)
        rows = lanes.to(tl.int64)[:, None]
        if window <= 0:
            tl.store(kv_start_ptr + lanes, tl.zeros([BLOCK_L], tl.int64), mask=lane_ok)
            for p0 in range(0, table_width, BLOCK_P):  # the page table as int64, a [lanes, BLOCK_P] tile at a time
                p = p0 + tl.arange(0, BLOCK_P)[None, :]
                ok = lane_ok[:, None] & (p < table_width)
                row = tl.load(table_ptr + rows * table_stride_lane + p * table_stride_page, mask=ok, other=0)
                tl.store(pages_ptr + rows * pages_width + p, row.to(tl.int64), mask=ok)
        else:
            if attention_chunk > 0:  # block-local: the first query's block start
                kv_start = cached // attention_chunk * attention_chunk
            else:
                kv_start = tl.maximum(cached - window + 1, 0)  # the window's first key, not an index
            tl.store(kv_start_ptr + lanes, kv_start, mask=lane_ok)
            first_page = (kv_start // page_size)[:, None]
            base = tl.load(slots_ptr + lanes, mask=lane_ok, other=0).to(tl.int64)[:, None] * ring_pages
            for j0 in range(0, ring_pages, BLOCK_P):
                j = j0 + tl.arange(0, BLOCK_P)[None, :]
                tl.store(pages_ptr + rows * pages_width + j, base + (first_page + j) % ring_pages,
                         mask=lane_ok[:, None] & (j < ring_pages))


def triton_prepare_attention_metadata(num_tokens: int, seq_lens, cached_lens, slots, page_table, page_size: int,
                                      window: int, ring_pages: int, attention_chunk: int = 0):
    """(write_idx [T], kv_start [B], kv_len [B], page_list [B, Pk], cu_seqlens [B+1]), int64, as
    ``prepare_attention_metadata``; ``page_table`` may be strided (the runner's is a transposed view)."""
    lanes, width = page_table.shape
    pages_width = width if window <= 0 else ring_pages
    dev, i64 = seq_lens.device, torch.int64
    write = torch.empty(num_tokens, dtype=i64, device=dev)
    kv_start, kv_len = torch.empty(lanes, dtype=i64, device=dev), torch.empty(lanes, dtype=i64, device=dev)
    pages = torch.empty(lanes, pages_width, dtype=i64, device=dev)
    cu = torch.empty(lanes + 1, dtype=i64, device=dev)
    block_t = 64
    _attention_metadata_kernel[(max(1, triton.cdiv(num_tokens, block_t)),)](
        seq_lens, cached_lens, slots, page_table, write, kv_start, kv_len, pages, cu,
        num_tokens, lanes, width, page_table.stride(0), page_table.stride(1), page_size, window, ring_pages,
        pages_width, attention_chunk,
        BLOCK_T=block_t, BLOCK_L=triton.next_power_of_2(lanes),
        BLOCK_P=min(max(2048 // triton.next_power_of_2(lanes), 8), triton.next_power_of_2(max(pages_width, 1))),
        **pdl_launch(seq_lens.device),
    )
    return write, kv_start, kv_len, pages, cu


@triton.jit
def _ssm_metadata_kernel(seq_lens_ptr, cached_ptr, accepted_ptr, verify_ptr, cu_ptr, has_state_ptr, replay_ptr,
                         is_verify_ptr, num_lanes, BLOCK_L: tl.constexpr, PDL: tl.constexpr = False):
    pdl_wait(PDL)
    lanes = tl.arange(0, BLOCK_L)
    ok = lanes < num_lanes
    lens = tl.load(seq_lens_ptr + lanes, mask=ok, other=0).to(tl.int64)
    tl.store(cu_ptr + lanes + 1, tl.cumsum(lens, axis=0), mask=ok)
    tl.store(cu_ptr + lanes, tl.zeros([BLOCK_L], tl.int64), mask=lanes == 0)
    tl.store(has_state_ptr + lanes, (tl.load(cached_ptr + lanes, mask=ok, other=0) > 0).to(tl.int8), mask=ok)
    tl.store(replay_ptr + lanes, tl.load(accepted_ptr + lanes, mask=ok, other=0).to(tl.int64), mask=ok)
    verify = tl.load(verify_ptr + lanes, mask=ok, other=0) != 0
    tl.store(is_verify_ptr + lanes, (verify & (lens > 0)).to(tl.int8), mask=ok)


def triton_prepare_ssm_metadata(seq_lens, cached_lens, accepted_lens, verify):
    """(cu_seqlens [B+1] int64, has_state [B] bool, replay_lens [B] int64, is_verify [B] bool), as
    ``prepare_ssm_metadata``."""
    lanes, dev = seq_lens.shape[0], seq_lens.device
    cu = torch.empty(lanes + 1, dtype=torch.int64, device=dev)
    has_state = torch.empty(lanes, dtype=torch.bool, device=dev)
    replay = torch.empty(lanes, dtype=torch.int64, device=dev)
    is_verify = torch.empty(lanes, dtype=torch.bool, device=dev)
    _ssm_metadata_kernel[(1,)](seq_lens, cached_lens, accepted_lens, verify.view(torch.uint8), cu,
                               has_state.view(torch.uint8), replay, is_verify.view(torch.uint8), lanes,
                               BLOCK_L=triton.next_power_of_2(lanes), **pdl_launch(seq_lens.device))
    return cu, has_state, replay, is_verify
