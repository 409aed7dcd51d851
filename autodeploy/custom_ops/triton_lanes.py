"""Lane maps computed inside Triton kernels from ``cu_seqlens``, shared by the kernels that split
a step's lanes into work items (the attention's query blocks, the SSD scan's parallel chunks).

Lane b owns a run of ``units[b]`` consecutive items, in lane order, so item ids need no per-layer
torch ops to map back to lanes: each program derives its own lane from the [BLOCK_L] vector of
runs (BLOCK_L >= the lane count, a power of two).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["lane_lengths", "lane_run", "owning_lane"]


@triton.jit
def lane_lengths(cu_seqlens_ptr, num_lanes, BLOCK_L: tl.constexpr):
    """[BLOCK_L] tokens per lane (0 past ``num_lanes``)."""
    lanes = tl.arange(0, BLOCK_L)
    ok = lanes < num_lanes
    return tl.load(cu_seqlens_ptr + lanes + 1, mask=ok, other=0) - tl.load(cu_seqlens_ptr + lanes, mask=ok, other=0)


@triton.jit
def lane_run(units, ends, lane, BLOCK_L: tl.constexpr):
    """(first item id, item count) of ``lane``'s run; ``ends`` is ``tl.cumsum(units)``."""
    mine = tl.arange(0, BLOCK_L) == lane
    return tl.sum(tl.where(mine, ends - units, 0), axis=0), tl.sum(tl.where(mine, units, 0), axis=0)


@triton.jit
def owning_lane(units, item, num_lanes, BLOCK_L: tl.constexpr):
    """(lane, its first item id, its item count) for item id ``item``: the number of lanes whose
    runs all end at or before it. Items past every run get the last lane (outside its run: the
    caller sees ``item - first >= count``)."""
    ends = tl.cumsum(units, axis=0)
    lanes = tl.arange(0, BLOCK_L)
    lane = tl.minimum(tl.sum(tl.where((lanes < num_lanes) & (ends <= item), 1, 0), axis=0), num_lanes - 1)
    first, count = lane_run(units, ends, lane, BLOCK_L)
    return lane, first, count
