"""Cache pools and their allocators.

* Slots: one per running sequence, 1..max_batch_size; slot 0 is the null slot padded lanes use.
  Per-slot state (SSM, conv) and sliding-window rings are indexed by slot.
* Full-attention pages: page 0 is the null page; pages 1.. are handed out per sequence.
* Sliding-window pools need no allocator: slot s owns ring pages s*R .. s*R+R-1.

Accounting is exact: freeing something not allocated, or allocating twice, raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autodeploy.cache_spec import POOL_FULL, CacheSpec
from autodeploy.custom_ops.prepare_metadata import swa_ring_pages

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

    def __post_init__(self):
        if self.num_full_pages is None:
            self.num_full_pages = self.max_batch_size * self.max_pages_per_seq

    @property
    def max_pages_per_seq(self) -> int:
        return -(-self.max_seq_len // self.page_size)


class CachePools:
    """Allocates every cache tensor a graph's specs ask for, plus the slot and page allocators."""

    def __init__(self, specs: list[CacheSpec], sizes: PoolSizes, device: torch.device | str = "cpu"):
        self.specs, self.sizes = specs, sizes
        self.slots = IndexAllocator(sizes.max_batch_size, "sequence slots")
        self.pages = IndexAllocator(sizes.num_full_pages, "full-attention KV pages")
        self.tensors: dict[str, torch.Tensor] = {}
        slots_total = sizes.max_batch_size + 1
        for spec in specs:
            if spec.kind == "kv":
                if spec.pool == POOL_FULL:
                    pages = sizes.num_full_pages + 1
                else:
                    pages = slots_total * swa_ring_pages(spec.window, sizes.max_num_tokens, sizes.page_size)
                shape = (pages, sizes.page_size, *spec.shape)
            else:
                shape = (slots_total, *spec.shape)
            self.tensors[spec.name] = torch.zeros(shape, dtype=spec.dtype, device=device)

    def bytes_by_pool(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for spec in self.specs:
            t = self.tensors[spec.name]
            out[spec.pool] = out.get(spec.pool, 0) + t.numel() * t.element_size()
        return out

    def assert_empty(self) -> None:
        if self.slots.num_used or self.pages.num_used:
            raise AssertionError(f"pools not empty: {self.slots.num_used} slots, {self.pages.num_used} pages in use")
