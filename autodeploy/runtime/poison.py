"""Poisoning: prove that a step reads nothing but its raw inputs and the live cache contents.

Before a step runs (eager, compiled, or a CUDA-graph replay), ``poison_step`` fills with garbage
(NaN for floats, 0x7FFFFFFF for integers) everything the step has no business reading:

- every graph input that is neither a raw step input nor a cache (metadata prepared outside the
  graph would be such an input, stale after a CUDA-graph replay that skipped the code preparing it);
- full-attention pages no sequence owns and the prefix cache does not keep, the null page, and in
  the pages of the step's sequences every position at or past its cached length (rejected drafts
  live there, and the rows of a partial page after a restored prefix);
- prefix snapshots rows that hold no snapshot;
- sliding-window ring rows of the step's sequences outside the window before the step; the rings,
  SSM/conv state and replay buffers of slots no sequence owns and of the null slot;
- replay-buffer entries past the count each lane replays;
- with CUDA graphs, the whole private memory pool the captured graphs share (their intermediate
  buffers: every derived metadata tensor), through a captured fill of every free block.

If outputs are unchanged with poisoning on, no kernel read a stale, unowned or out-of-window value.
Poisoning is a test and debugging aid (``GraphRunner.poison = True``); it costs a full pass over
the caches per step.
"""

from __future__ import annotations

import torch

from autodeploy.cache_spec import POOL_FULL, POOL_REPLAY, STEP_INPUTS
from autodeploy.runtime.batch import LaneInput

INT_POISON = 0x7FFFFFFF


def fill_garbage(t: torch.Tensor) -> None:
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(INT_POISON if t.dtype in (torch.int32, torch.int64) else -1)


def _rows_mask(num_rows: int, keep_rows: set[int], device) -> torch.Tensor:
    mask = torch.ones(num_rows, dtype=torch.bool, device=device)
    if keep_rows:
        mask[torch.tensor(sorted(keep_rows), device=device)] = False
    return mask


def poison_step(runner, lanes: list[LaneInput], graph_inputs: dict[str, torch.Tensor]) -> None:
    """Poison everything the step about to run over ``lanes`` must not read (see module doc)."""
    pools, sizes = runner.pools, runner.sizes
    for name, value in graph_inputs.items():
        if name not in STEP_INPUTS and name not in pools.tensors and isinstance(value, torch.Tensor):
            fill_garbage(value)
    used_slots, used_pages = pools.slots.used, pools.pages.resident  # cached prefix pages keep their contents
    by_slot = {lane.slot: lane for lane in lanes if lane.slot}
    page = sizes.page_size
    for spec in pools.specs:
        t = pools.tensors[spec.name]
        if spec.kind == "kv" and spec.pool == POOL_FULL:
            flat = t.view(-1, *t.shape[2:])
            keep = {row for p in used_pages for row in range(p * page, (p + 1) * page)}
            for lane in lanes:  # the step's sequences: positions >= cached length are not theirs yet
                keep -= {lane.pages[pos // page] * page + pos % page
                         for pos in range(lane.cached_len, len(lane.pages) * page)}
            flat[_rows_mask(flat.shape[0], keep, t.device)] = float("nan")
        elif spec.kind == "kv":  # a sliding-window ring of R pages per slot
            ring = t.shape[0] // (sizes.max_batch_size + 1)
            flat = t.view(-1, *t.shape[2:])
            keep = set()
            for slot in used_slots:
                lane = by_slot.get(slot)
                if lane is None:
                    keep.update(range(slot * ring * page, (slot + 1) * ring * page))
                    continue
                keep.update((slot * ring + (pos // page) % ring) * page + pos % page
                            for pos in range(max(0, lane.cached_len - spec.window + 1), lane.cached_len))
            flat[_rows_mask(flat.shape[0], keep, t.device)] = float("nan")
        else:  # per-slot state and replay buffers
            for slot in range(t.shape[0]):
                if slot not in used_slots:
                    fill_garbage(t[slot])
                elif spec.pool == POOL_REPLAY and slot in by_slot:
                    fill_garbage(t[slot, by_slot[slot].accepted:])
    poison_free_snapshots(pools.snapshots)


def poison_free_snapshots(snapshots) -> None:
    """Garble the rows of the prefix-snapshot pool that hold no snapshot."""
    if snapshots is None or not snapshots._free:
        return
    for tensor in snapshots.tensors():
        rows = torch.tensor(snapshots._free, device=tensor.device)
        tensor.index_fill_(0, rows, float("nan") if tensor.is_floating_point() else -1)


class PoolPoisoner:
    """A CUDA graph, captured in the captured graphs' memory pool, that fills every free block of
    that pool with 0x7FFFFFFF (a NaN as float32): replayed before a step, it garbles every
    intermediate buffer the step's graph will use."""

    def __init__(self, pool, device):
        blocks = []
        for segment in torch.cuda.memory_snapshot():
            if tuple(segment.get("segment_pool_id", ())) != tuple(pool):
                continue
            blocks += [b["size"] for b in segment["blocks"] if b["state"] == "inactive"]
        self.bytes = sum(blocks)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            held = [torch.empty(size // 4, dtype=torch.int32, device=device) for size in sorted(blocks, reverse=True)]
            for t in held:  # all allocated before any is filled, so no block is handed out twice
                t.fill_(INT_POISON)
            del held

    def __call__(self) -> None:
        self.graph.replay()
