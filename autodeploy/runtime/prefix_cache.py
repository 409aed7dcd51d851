"""Exact prefix caching: reuse the caches a finished or running request left behind.

Three parts, all host bookkeeping over the existing pools (the graph is unchanged: a hit reaches
it as raw facts, a lane's cached length and page table, and as the contents of its slot):

* ``PagePool``: the full-attention pages with reference counts. A page whose tokens are all
  committed gets a content key, the chained digest of its tokens and of every token before it
  (``page_digests``); requests whose prompts start with the same pages share them. A page nobody
  holds any more keeps its contents and key on an LRU list and is evicted (its key dropped, the
  page handed out again) only when an allocation finds no never-used page.
* ``SnapshotPool``: what a hit at position P needs besides full-attention pages, copied out of a
  sequence's slot into a pool of its own: every per-slot state (SSM and conv state) and the last
  ``window`` keys of every sliding-window ring, plus, when P is not at a page boundary, the
  full-attention page holding the tokens after the last full page (its first P % page_size rows).
  A snapshot is keyed by (digest of the full pages before P, the tokens after them), so it is
  found only by a prompt that starts with exactly the P tokens it was taken after. Snapshots are
  taken at block boundaries during prefill (the scheduler ends a prefill chunk there) and at the
  exact end of every finished request; the pool holds ``num_snapshots`` of them, evicted LRU.
* ``PrefixCache``: lookup (the longest reusable prefix of a prompt), admission (share the pages,
  copy a snapshot into the slot), registration (key the pages a request has committed) and the
  snapshots, with hit counters.

Only committed state is ever keyed or snapshotted: tokens the host knows (not a token still on
the device under async scheduling) whose caches were written by a launched step (not drafts
under verification: a verify step leaves the SSM state before its tokens, and the engine replays
the accepted ones later, so the end snapshot is taken at ``num_cached - accepted``). Copies run
on the engine's stream after every step that wrote the source, and before every step that reads
the destination, so stream order makes them exact without waiting.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from autodeploy.cache_spec import POOL_FULL, POOL_REPLAY, CacheSpec
from autodeploy.runtime.pools import IndexAllocator, PoolExhausted, ring_pages_kept

ROOT = b""  # the digest of the empty prefix
DEFAULT_SNAPSHOT_INTERVAL = 256  # tokens between prefill snapshots of a model with per-slot state


def page_digests(tokens: list[int], page_size: int, parent: bytes = ROOT, start_page: int = 0,
                 num_pages: int | None = None) -> list[bytes]:
    """Chained digests of the full pages ``start_page``.. of ``tokens`` (``parent``: the digest of
    the pages before): digest i covers every token of pages 0..i. SHA-256, as vLLM's default."""
    end = len(tokens) // page_size if num_pages is None else start_page + num_pages
    out = []
    for page in range(start_page, end):
        block = np.asarray(tokens[page * page_size:(page + 1) * page_size], dtype=np.int64).tobytes()
        parent = hashlib.sha256(parent + block).digest()
        out.append(parent)
    return out


class PagePool(IndexAllocator):
    """Full-attention pages (1..capacity) with reference counts and content keys.

    ``allocate`` hands out never-used (or plain freed) pages first, then evicts the least
    recently used cached page. ``free`` drops one reference; a page with no references left
    returns to the free list, or, if keyed, to the LRU list with its contents. ``used`` holds the
    referenced pages; ``resident`` also the cached ones (contents a later request may read)."""

    def __init__(self, capacity: int, what: str = "full-attention KV pages"):
        super().__init__(capacity, what)
        self.refs: dict[int, int] = {}
        self.page_of: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # keyed pages with no reference, oldest first
        self.num_evicted = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self.lru)

    @property
    def used(self) -> frozenset[int]:
        return frozenset(self.refs)

    @property
    def num_used(self) -> int:
        return len(self.refs)

    @property
    def resident(self) -> frozenset[int]:
        return frozenset(self.refs) | frozenset(self.lru)

    @property
    def num_cached(self) -> int:
        """Keyed pages (referenced or not)."""
        return len(self.key_of)

    def allocate(self, n: int = 1) -> list[int]:
        if n > self.num_free:
            raise PoolExhausted(f"{self.what}: need {n}, {self.num_free} free of {self.capacity}")
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
                self._used.add(page)  # the base class's set: every page off the free list
            else:
                page, _ = self.lru.popitem(last=False)
                del self.page_of[self.key_of.pop(page)]
                self.num_evicted += 1
            self.refs[page] = 1
            out.append(page)
        return out

    def share(self, pages: list[int]) -> None:
        """Take one more reference to each of ``pages`` (cached pages, found by ``match``)."""
        for page in pages:
            if page not in self.key_of:
                raise RuntimeError(f"{self.what}: sharing page {page}, which holds no cached prefix")
            if page in self.lru:
                del self.lru[page]
            self.refs[page] = self.refs.get(page, 0) + 1

    def free(self, indices: list[int]) -> None:
        for page in indices:
            count = self.refs.get(page, 0)
            if count == 0:
                raise RuntimeError(f"{self.what}: freeing {page}, which is not allocated")
            if count > 1:
                self.refs[page] = count - 1
                continue
            del self.refs[page]
            if page in self.key_of:
                self.lru[page] = None
            else:
                self._used.discard(page)
                self._free.append(page)

    def register(self, page: int, key: bytes) -> None:
        """Key a referenced page whose tokens are all committed. A page whose content is already
        cached under another page stays unkeyed (it is freed normally)."""
        if page not in self.refs:
            raise RuntimeError(f"{self.what}: keying page {page}, which is not allocated")
        if key in self.page_of or page in self.key_of:
            return
        self.page_of[key] = page
        self.key_of[page] = key

    def drop_cached(self) -> None:
        """Forget every key; cached pages nobody holds return to the free list."""
        for page in self.lru:
            self._used.discard(page)
            self._free.append(page)
        self.lru.clear()
        self.page_of.clear()
        self.key_of.clear()

    def match(self, keys: list[bytes]) -> list[int]:
        """The cached pages of the longest run of ``keys`` from the first."""
        out = []
        for key in keys:
            page = self.page_of.get(key)
            if page is None:
                break
            out.append(page)
        return out

    def num_free_after_sharing(self, pages: list[int]) -> int:
        return self.num_free - sum(page in self.lru for page in pages)

    def check(self, held: list[int]) -> list[str]:
        """Accounting problems, given every page the running requests hold (with repeats)."""
        counts: dict[int, int] = {}
        for page in held:
            counts[page] = counts.get(page, 0) + 1
        problems = []
        if counts != self.refs:
            problems.append("pages of running requests differ from the pages' reference counts (leaked or held twice)")
        if set(self.lru) & set(self.refs) or not set(self.lru) <= set(self.key_of):
            problems.append("the LRU list holds referenced or unkeyed pages")
        if set(self._used) != set(self.refs) | set(self.lru) or set(self._free) & set(self._used):
            problems.append("free list and page states disagree")
        if {p: k for k, p in self.page_of.items()} != self.key_of:
            problems.append("page keys are not one-to-one")
        return problems


@dataclass
class Snapshot:
    index: int  # row of the snapshot tensors
    position: int  # tokens it covers


class SnapshotPool:
    """Copies of what a hit needs besides shared full-attention pages (see the module docstring),
    ``capacity`` rows per cache, LRU by key."""

    def __init__(self, specs: list[CacheSpec], tensors: dict[str, torch.Tensor], num_slots: int, page_size: int,
                 capacity: int, device):
        self.capacity, self.page_size = capacity, page_size
        self.state, self.rings, self.pages = [], [], []  # (source, snapshot[, the ring's window])
        for spec in specs:
            src = tensors[spec.name]
            if spec.pool == POOL_REPLAY:
                continue  # replay buffers hold drafts under verification: never committed state
            if spec.kind == "state":
                self.state.append((src, torch.zeros((capacity, *src.shape[1:]), dtype=src.dtype, device=device)))
            elif spec.pool == POOL_FULL:
                self.pages.append((src, torch.zeros((capacity, *src.shape[1:]), dtype=src.dtype, device=device)))
            else:  # a sliding-window (or chunked) ring of R pages per slot: keep the pages of the last W keys
                ring = src.unflatten(0, (num_slots, -1))
                keep = ring_pages_kept(spec.window, ring.shape[1], page_size)
                self.rings.append((ring, torch.zeros((capacity, keep, *src.shape[1:]), dtype=src.dtype, device=device),
                                   spec.window))
        self.entries: OrderedDict[tuple[bytes, tuple[int, ...]], Snapshot] = OrderedDict()  # oldest first
        self.tails: dict[bytes, set[tuple[int, ...]]] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self.num_taken = self.num_evicted = 0

    def tensors(self) -> list[torch.Tensor]:
        return [t for _, t in self.state] + [t for _, t in self.pages] + [t for _, t, _ in self.rings]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()
        self.tails.clear()
        self._free = list(range(self.capacity - 1, -1, -1))

    def find(self, key: bytes, tokens_after: list[int], limit: int) -> tuple[tuple[int, ...], Snapshot] | None:
        """The snapshot after the pages keyed ``key`` whose tail is the longest prefix of
        ``tokens_after`` of at most ``limit`` tokens."""
        best = None
        for tail in self.tails.get(key, ()):
            longer = best is None or len(tail) > len(best)
            if len(tail) <= limit and tuple(tokens_after[:len(tail)]) == tail and longer:
                best = tail
        return None if best is None else (best, self.entries[(key, best)])

    def _ring_pages(self, window: int, position: int, keep: int) -> list[int]:
        first = max(0, position - window + 1) // self.page_size
        return list(range(first, first + keep))

    def take(self, key: bytes, tail: tuple[int, ...], position: int, slot: int, tail_page: int | None) -> None:
        """Copy slot ``slot`` (and ``tail_page``, the full-attention page holding ``tail``) as the
        state after ``position`` tokens; a snapshot under the same key is only refreshed."""
        if not self.capacity:
            return
        entry = self.entries.get((key, tail))
        if entry is not None:
            self.entries.move_to_end((key, tail))
            return
        if not self._free:
            (old_key, old_tail), old = self.entries.popitem(last=False)
            self.tails[old_key].discard(old_tail)
            if not self.tails[old_key]:
                del self.tails[old_key]
            self._free.append(old.index)
            self.num_evicted += 1
        index = self._free.pop()
        for src, dst in self.state:
            dst[index].copy_(src[slot])
        for ring, dst, window in self.rings:
            r = ring.shape[1]
            logical = self._ring_pages(window, position, dst.shape[1])
            dst[index].copy_(ring[slot, [p % r for p in logical]])
        if tail_page is not None:
            for src, dst in self.pages:
                dst[index].copy_(src[tail_page])
        self.entries[(key, tail)] = Snapshot(index, position)
        self.tails.setdefault(key, set()).add(tail)
        self.num_taken += 1

    def restore(self, key: bytes, tail: tuple[int, ...], slot: int, tail_page: int | None) -> None:
        """Copy snapshot (key, tail) into slot ``slot`` (and its tail into page ``tail_page``)."""
        entry = self.entries[(key, tail)]
        self.entries.move_to_end((key, tail))
        for src, dst in self.state:
            src[slot].copy_(dst[entry.index])
        for ring, dst, window in self.rings:
            r = ring.shape[1]
            logical = self._ring_pages(window, entry.position, dst.shape[1])
            ring[slot, [p % r for p in logical]] = dst[entry.index]
        if tail_page is not None:
            for src, dst in self.pages:
                src[tail_page].copy_(dst[entry.index])


@dataclass
class Hit:
    """The reusable prefix of a prompt: ``position`` tokens, the shared ``pages`` before it, and
    the snapshot (key, tail) to restore, if one is needed."""

    position: int = 0
    pages: list[int] | None = None
    snapshot: tuple[bytes, tuple[int, ...]] | None = None


@dataclass
class PrefixCacheStats:
    """Counts since the engine started: prompts looked up, their tokens, and how many were reused."""

    num_requests: int = 0
    num_hit_requests: int = 0
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        """Fraction of prompt tokens read from the cache instead of computed."""
        return self.num_cached_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0


class PrefixCache:
    """The engine's prefix cache over its pools (``pools.pages`` is a PagePool, ``pools.snapshots``
    a SnapshotPool or None). ``interval``: tokens between the prefill snapshots of a stateful model."""

    def __init__(self, pools, page_size: int, interval: int):
        if interval <= 0 or interval % page_size:
            raise ValueError(f"prefix snapshot interval {interval} must be a positive multiple of page_size "
                             f"{page_size}")
        self.pools, self.page_size, self.interval = pools, page_size, interval
        self.pages: PagePool = pools.pages
        self.snapshots: SnapshotPool | None = pools.snapshots
        # per-slot state or rings: a hit then needs a snapshot at its exact position
        self.stateful = any(s.pool not in (POOL_FULL, POOL_REPLAY) for s in pools.specs)
        self.has_pages = bool(self.pages.capacity)
        self.stats = PrefixCacheStats()

    def clear(self) -> None:
        """Forget every cached prefix (no request may hold pages)."""
        self.pages.drop_cached()
        if self.snapshots is not None:
            self.snapshots.clear()

    def lookup(self, prompt: list[int], keys: list[bytes]) -> Hit:
        """The longest prefix of ``prompt`` that can be reused, leaving at least its last token
        to compute (its logits give the first output token). ``keys``: the prompt's page digests."""
        limit = len(prompt) - 1
        usable = limit // self.page_size
        matched = self.pages.match(keys[:usable]) if self.has_pages else []
        top = len(matched) if self.has_pages else usable
        for k in range(top, -1, -1):
            key = keys[k - 1] if k else ROOT
            found = None
            if self.snapshots is not None:
                found = self.snapshots.find(key, prompt[k * self.page_size:], limit - k * self.page_size)
            if found is not None and (found[0] or self.stateful):
                tail, _ = found
                return Hit(k * self.page_size + len(tail), matched[:k], (key, tail))
            if not self.stateful and k > 0:
                return Hit(k * self.page_size, matched[:k], None)
        return Hit(0, [], None)

    def admit(self, hit: Hit, slot: int, pages: list[int]) -> None:
        """Make ``hit`` the start of the sequence in ``slot`` with ``pages`` (shared ones first):
        restore its snapshot, the tail page into the first page of its own."""
        if hit.snapshot is not None:
            key, tail = hit.snapshot
            tail_page = pages[len(hit.pages)] if tail and self.has_pages else None
            self.snapshots.restore(key, tail, slot, tail_page)

    def count(self, prompt_len: int, hit: Hit) -> None:
        self.stats.num_requests += 1
        self.stats.num_prompt_tokens += prompt_len
        self.stats.num_cached_tokens += hit.position
        self.stats.num_hit_requests += hit.position > 0

    def register(self, req) -> None:
        """Key every page of ``req`` whose tokens are all committed and known to the host."""
        if not self.has_pages:
            return
        known = min(req.num_cached, len(req.prompt) + len(req.output))
        full = min(known // self.page_size, len(req.pages))
        self._ensure_keys(req, full)
        for i in range(req.num_keyed, full):
            self.pages.register(req.pages[i], req.keys[i])
        req.num_keyed = max(req.num_keyed, full)

    def next_boundary(self, req, start: int) -> int | None:
        """The first prefill snapshot boundary after ``start`` inside ``req``'s prompt (before its
        last token) that has no snapshot yet, or None: a prefill chunk ends there."""
        if not self.stateful or not self.snapshots.capacity:
            return None
        boundary = (start // self.interval + 1) * self.interval
        while boundary < len(req.prompt):
            k = boundary // self.page_size
            self._ensure_keys(req, k)
            if (req.keys[k - 1], ()) not in self.snapshots.entries:
                return boundary
            boundary += self.interval
        return None

    def _ensure_keys(self, req, num_pages: int) -> None:
        """Extend ``req.keys`` to its first ``num_pages`` pages (whose tokens the host knows)."""
        if num_pages > len(req.keys):
            req.keys += page_digests(req.tokens, self.page_size, req.keys[-1] if req.keys else ROOT,
                                     len(req.keys), num_pages - len(req.keys))

    def snapshot(self, req, position: int) -> None:
        """Snapshot ``req``'s slot as the state after its first ``position`` tokens (committed,
        known to the host, and exactly what the slot holds)."""
        if self.snapshots is None or position <= 0:
            return
        k, rest = divmod(position, self.page_size)
        if not self.stateful and not rest:
            return  # pure full attention: the keyed pages alone are the hit
        if not self.stateful and not self.has_pages:
            return
        self._ensure_keys(req, k)
        key = req.keys[k - 1] if k else ROOT
        tail = tuple(req.tokens[k * self.page_size:position])
        tail_page = req.pages[k] if rest and self.has_pages else None
        self.snapshots.take(key, tail, position, req.slot, tail_page)
