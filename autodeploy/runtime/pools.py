"""Cache pools and their allocators.

* Slots: one per running sequence, 1..max_batch_size; slot 0 is the null slot padded lanes use.
  Per-slot state (SSM, conv) and sliding-window rings are indexed by slot.
* Full-attention pages: page 0 is the null page; pages 1.. are handed out per sequence.
* Sliding-window pools need no allocator: slot s owns ring pages s*R .. s*R+R-1.
* Prefix snapshots (with prefix caching): ``num_snapshots`` copies of a slot's state, rings and
  one full-attention page each, in a pool of their own (runtime/prefix_cache.py).

Accounting is exact: freeing something not allocated, or allocating twice, raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from autodeploy.cache_spec import POOL_FULL, POOL_REPLAY, CacheSpec

POOL_SNAPSHOTS = "prefix_snapshots"  # the name cache_bytes() reports the snapshot pool under
NULL_SLOT = 0
NULL_PAGE = 0


class PoolExhausted(RuntimeError):
    pass


class IndexAllocator:
    """Hands out indices 1..capacity (0 is reserved as the null index)."""

    def __init__(self, capacity: int, what: str):
        self.capacity, self.what = capacity, what
        self._free = list(range(capacity, 0, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> frozenset[int]:
        return frozenset(self._used)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int = 1) -> list[int]:
        if n > len(self._free):
            raise PoolExhausted(f"{self.what}: need {n}, {len(self._free)} free of {self.capacity}")
        out = [self._free.pop() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, indices: list[int]) -> None:
        for i in indices:
            if i not in self._used:
                raise RuntimeError(f"{self.what}: freeing {i}, which is not allocated")
            self._used.remove(i)
            self._free.append(i)


@dataclass
class PoolSizes:
    max_batch_size: int
    max_seq_len: int
    page_size: int
    max_num_tokens: int
    # allocatable pages of the full-attention pool (null page excluded);
    # None: enough for max_batch_size requests of max_seq_len tokens
    num_full_pages: int | None = None
    num_snapshots: int = 0  # prefix-cache snapshots (runtime/prefix_cache.py); 0: none

    def __post_init__(self):
        if self.num_full_pages is None:
            self.num_full_pages = self.max_batch_size * self.max_pages_per_seq

    @property
    def max_pages_per_seq(self) -> int:
        return -(-self.max_seq_len // self.page_size)


def cache_shape(spec: CacheSpec, sizes: PoolSizes) -> tuple[int, ...]:
    """The tensor shape of one cache: pages x page_size x ... for KV, slots x ... for state.
    Full-attention pools add the null page; everything per slot adds the null slot."""
    slots_total = sizes.max_batch_size + 1
    if spec.kind != "kv":
        return (slots_total, *spec.shape)
    if spec.pool == POOL_FULL:
        pages = sizes.num_full_pages + 1
    else:
        pages = slots_total * spec.ring_pages  # the ring the graph's prepare node addresses
    return (pages, sizes.page_size, *spec.shape)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def ring_pages_kept(window: int, ring_pages: int, page_size: int) -> int:
    """Ring pages a prefix snapshot keeps: those of the W - 1 keys before its position, from the
    page of the first one (one page more keeps the bound simple), at most the whole ring."""
    return min(ring_pages, -(-(window - 1) // page_size) + 2)


def snapshot_bytes(specs: list[CacheSpec], sizes: PoolSizes) -> int:
    """Bytes of the prefix-snapshot pool: per snapshot, one slot's state, the pages of the last
    W keys of each ring and one full-attention page (runtime/prefix_cache.py's SnapshotPool)."""
    per = 0
    for s in specs:
        if s.pool == POOL_REPLAY:
            continue
        if s.kind == "state":
            per += _nbytes(s.shape, s.dtype)
        elif s.pool == POOL_FULL:
            per += _nbytes((sizes.page_size, *s.shape), s.dtype)
        else:
            per += _nbytes((ring_pages_kept(s.window, s.ring_pages, sizes.page_size), sizes.page_size, *s.shape),
                           s.dtype)
    return per * sizes.num_snapshots


def full_pages_within(budget_bytes: int, specs: list[CacheSpec], sizes: PoolSizes) -> int:
    """How many full-attention pages fit in ``budget_bytes`` once the caches whose size the
    budget cannot change (sliding-window rings, SSM and conv state: fixed by the batch size and
    the window; prefix snapshots) and the null page are paid for. Raises ValueError if not even
    one page fits."""
    fixed = sum(_nbytes(cache_shape(s, sizes), s.dtype) for s in specs if s.pool != POOL_FULL)
    fixed += snapshot_bytes(specs, sizes)
    per_page = sum(_nbytes((sizes.page_size, *s.shape), s.dtype) for s in specs if s.pool == POOL_FULL)
    if not per_page:
        if budget_bytes < fixed:
            raise ValueError(f"cache budget {budget_bytes} bytes is below the fixed caches ({fixed} bytes: "
                             f"per-slot state and sliding-window rings for {sizes.max_batch_size} sequences); "
                             "raise it or lower max_batch_size")
        return sizes.num_full_pages
    pages = (budget_bytes - fixed) // per_page - 1  # minus the null page
    if pages < 1:
        raise ValueError(f"cache budget {budget_bytes} bytes leaves no full-attention page: the fixed caches take "
                         f"{fixed} bytes (per-slot state and sliding-window rings for {sizes.max_batch_size} "
                         f"sequences) and one page of {sizes.page_size} tokens takes {per_page}; raise the budget "
                         "or lower max_batch_size")
    return pages


class CachePools:
    """Allocates every cache tensor a graph's specs ask for, plus the slot and page allocators."""

    def __init__(self, specs: list[CacheSpec], sizes: PoolSizes, device: torch.device | str = "cpu"):
        self.specs, self.sizes = specs, sizes
        # prefix_cache builds on IndexAllocator: imported here, not at the top
        from autodeploy.runtime.prefix_cache import PagePool, SnapshotPool

        self.slots = IndexAllocator(sizes.max_batch_size, "sequence slots")
        self.pages = PagePool(sizes.num_full_pages)
        self.tensors = {
            spec.name: torch.zeros(cache_shape(spec, sizes), dtype=spec.dtype, device=device) for spec in specs
        }
        self.snapshots = SnapshotPool(specs, self.tensors, sizes.max_batch_size + 1, sizes.page_size,
                                      sizes.num_snapshots, device) if sizes.num_snapshots else None

    def bytes_by_pool(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for spec in self.specs:
            t = self.tensors[spec.name]
            out[spec.pool] = out.get(spec.pool, 0) + t.numel() * t.element_size()
        if self.snapshots is not None:
            out[POOL_SNAPSHOTS] = self.snapshots.nbytes()
        return out

    def assert_empty(self) -> None:
        if self.slots.num_used or self.pages.num_used:
            raise AssertionError(f"pools not empty: {self.slots.num_used} slots, {self.pages.num_used} pages in use")
