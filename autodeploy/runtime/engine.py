"""The engine: continuous batching with chunked prefill over one cached graph.

Each ``step()`` picks lanes under a token budget (decodes first, then prefill chunks of running
requests, then newly admitted requests), writes the raw inputs, runs the graph once, and samples
the next token of every lane whose sequence is fully in the cache. Admission reserves a slot and
the full-attention pages for the request's whole length (prompt + max_tokens), so a running
request never runs out of pages; requests that do not fit yet wait.

With a drafter, a decode lane becomes a verify lane: the last token plus up to K drafts (never
past max_tokens, within the step's token budget); ``accept`` decides how many are committed, and
the accepted count is handed to the next step's graph, which replays it onto the SSM state.

Async scheduling (without a drafter): the next token of every lane is chosen on the device
(``sampling.sample_rows``) and fed to the next step's input ids by a device copy, so the host
never waits for the device between steps: ``step()`` launches step N, then reads back step N-1's
tokens (long since computed) while the device runs step N. The host therefore learns tokens one
step late: ``max_tokens`` is exact (it counts tokens, not their values), a stop token is found one
step after it was sampled, and the lane that step already launched for the request is discarded.
Nothing a finished request's lane writes can reach another request: its slot and pages are
reused only by steps that run after it on the same stream. With a drafter, steps are synchronous
(the drafter reads the latest tokens).

Prefix caching (``prefix_caching=True``, runtime/prefix_cache.py): admission looks up the longest
cached prefix of the prompt, shares its full-attention pages, copies its snapshot (per-slot state,
window keys, the partial page) into the request's slot and pages, and starts the request with
that many tokens cached; nothing else changes, the graph sees a cached length and a page table.
After every step the pages whose tokens are committed get their content keys; for a model with
per-slot state a prefill chunk ends at each snapshot boundary without a snapshot, which is taken
after the step; a finishing request leaves a snapshot of its exact end.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule

from autodeploy.runtime.batch import DeviceTokens, LaneInput, logit_row_count
from autodeploy.runtime.pools import PoolSizes
from autodeploy.runtime.prefix_cache import (
    DEFAULT_SNAPSHOT_INTERVAL,
    Hit,
    PrefixCache,
    page_digests,
)
from autodeploy.runtime.runner import GraphRunner
from autodeploy.runtime.sampling import SamplingParams, sample_rows
from autodeploy.runtime.speculative import Draft, Drafter, SpecDecodingStats, accept

logger = logging.getLogger("autodeploy.engine")


@dataclass
class Request:
    request_id: int
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    num_cached: int = 0
    slot: int = 0
    pages: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    generator: torch.Generator | None = None  # draws of the speculative acceptance rule
    seed: int = 0  # keys the device sampler's random numbers (with the token's index)
    accepted: int = 0  # tokens of the last verify step that were committed: the next step replays them
    pending: int = 0  # tokens chosen on the device by the step in flight, not yet in ``output``
    pending_row: int = 0  # where that step's chosen tokens hold it
    spec: SpecDecodingStats = field(default_factory=SpecDecodingStats)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    keys: list[bytes] = field(default_factory=list)  # content keys of the sequence's full pages (prefix caching)
    num_keyed: int = 0  # pages of ``pages`` keyed in the page pool

    @property
    def tokens(self) -> list[int]:
        """The tokens the host knows: prompt and output (not a token still on the device)."""
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence, a pending one included."""
        return len(self.prompt) + len(self.output) + self.pending

    @property
    def num_generated(self) -> int:
        return len(self.output) + self.pending

    def new_tokens(self, n: int) -> list[int]:
        """The ``n`` tokens after the cached ones, without building the whole sequence (the decode
        loop asks for one token of every lane every step). A pending token is not known here."""
        start, split = self.num_cached, len(self.prompt)
        if start >= split:
            return self.output[start - split:start - split + n]
        return self.prompt[start:start + n] + self.output[:max(0, start + n - split)]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Launched:
    """A step whose chosen tokens are still on their way to the host."""

    sampled: list[tuple[Request, int]]  # (request, row of ``tokens``) for every lane that chose a token
    tokens: torch.Tensor  # [rows] int64 on the device: the chosen tokens (next step's inputs)
    host: torch.Tensor  # [rows] pinned (or plain, on the CPU) host copy, valid once ``ready`` is reached
    ready: torch.cuda.Event | None


class Engine:
    """Runs a cached GraphModule. ``add_request`` validates; ``step`` advances every request."""

    def __init__(self, gm: GraphModule | GraphRunner, sizes: PoolSizes, vocab_size: int,
                 eos_token_ids: Iterable[int] = (), device: torch.device | str = "cpu", drafter: Drafter | None = None,
                 async_scheduling: bool = True, prefix_caching: bool = False, snapshot_interval: int | None = None):
        """``gm``: the cached graph (run eagerly) or a GraphRunner built with a compile mode.
        ``async_scheduling``: feed each step's chosen tokens to the next step on the device and read
        them back one step late (see the module docstring); off: every step waits for its tokens.
        ``prefix_caching``: reuse cached prefixes (snapshots need ``sizes.num_snapshots`` > 0);
        ``snapshot_interval``: tokens between prefill snapshots of a model with per-slot state
        (default: DEFAULT_SNAPSHOT_INTERVAL rounded to pages)."""
        self.runner = gm if isinstance(gm, GraphRunner) else GraphRunner(gm, sizes, device)
        self.gm, self.sizes, self.vocab_size = self.runner.gm, sizes, vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.pools = self.runner.pools
        self.checked = False  # checked mode: verify pool accounting after every step
        self.drafter = drafter
        if drafter is not None:  # its verify lanes carry 1 + K tokens: the graphs' replay buffers and rows hold them
            for runner in (self.runner, getattr(drafter, "runner", None)):
                if runner is not None:
                    runner.record.check_sizes(runner.sizes, drafter.max_draft_tokens)
        self.async_scheduling = async_scheduling
        self.prefix: PrefixCache | None = None
        if prefix_caching:
            page = sizes.page_size
            interval = snapshot_interval or max(page, DEFAULT_SNAPSHOT_INTERVAL // page * page)
            self.prefix = PrefixCache(self.pools, page, interval)
        self._snapshot_after: list[tuple[Request, int]] = []  # prefill lanes of this step ending at a boundary
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._inflight: _Launched | None = None
        pin = torch.device(device).type == "cuda"
        rows = sizes.max_batch_size * (1 + (drafter.max_draft_tokens if drafter else 0)) + 1
        # two host buffers for the chosen tokens, alternating: step N's copy may land while the host
        # still reads step N-1's
        self._host_tokens = [torch.zeros(max(rows, sizes.max_batch_size + 1), dtype=torch.long, pin_memory=pin)
                             for _ in range(2)]
        self.num_steps = 0
        # seconds spent per part of step(): schedule, draft, run (runner: input prep, plans and the
        # graph launch), sync (waiting for the chosen tokens), post (accept, stop checks)
        self.timings: Counter = Counter()

    # -- requests --------------------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams) -> int:
        """Validate and queue a request; raises ValueError before touching any state."""
        if not prompt:
            raise ValueError("empty prompt: give at least one token")
        bad = [t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}) or not int: {bad[:5]}")
        total = len(prompt) + params.max_tokens
        if total > self.sizes.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                             f"max_seq_len {self.sizes.max_seq_len}")
        if self._pages_for(total) > self.sizes.num_full_pages:
            raise ValueError(f"request needs {self._pages_for(total)} KV pages, the whole pool has "
                             f"{self.sizes.num_full_pages}; raise num_pages or lower max_tokens")
        req = Request(next(self._ids), list(prompt), params)
        if params.seed is not None:
            req.generator = torch.Generator().manual_seed(params.seed)
            req.seed = params.seed
        elif params.temperature > 0:
            req.seed = int(torch.randint(2**62, ()).item())  # from torch's global RNG: torch.manual_seed rules
        self.requests[req.request_id] = req
        self.waiting.append(req)
        return req.request_id

    def abort(self, request_id: int) -> None:
        req = self.requests[request_id]
        if req.finished:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        self._finish(req, "abort")

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (keyed pages become free, snapshots are dropped); only
        between requests: raises while any is waiting or running."""
        if self.prefix is None:
            return
        if self.has_unfinished():  # a step still in flight only writes pages stream-ordered before any reuse
            raise RuntimeError("reset_prefix_cache: requests are still waiting or running; finish or abort them first")
        self.prefix.clear()

    def has_unfinished(self) -> bool:
        """Requests waiting or running (a running one may only await its last token from the step in
        flight; the lanes of requests that finished or were aborted meanwhile are dropped unread)."""
        return bool(self.waiting or self.running)

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.sizes.page_size) if self.pools.pages.capacity else 0

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        req.pending = 0
        if self.drafter is not None:
            self.drafter.release(req)
        if req in self.running:
            if self.prefix is not None:
                self.prefix.register(req)
                # the slot holds the state after num_cached - accepted tokens (a verify step's
                # accepted tokens are replayed by the next step); a token still on the device
                # when the request was aborted is not known: then there is no exact end to keep
                end = req.num_cached - req.accepted
                if end <= len(req.prompt) + len(req.output):
                    self.prefix.snapshot(req, end)
            # a step in flight may still write this slot and these pages: any later owner's steps
            # run after it on the same stream
            self.running.remove(req)
            self.pools.slots.free([req.slot])
            self.pools.pages.free(req.pages)
            req.slot, req.pages = 0, []

    # -- scheduling ------------------------------------------------------------------------------
    def _schedule(self) -> tuple[list[tuple[Request, int]], dict[int, int]]:
        """Lanes as (request, new tokens), and lane index -> how many drafts a decode lane may carry."""
        budget, lanes, room = self.sizes.max_num_tokens, [], {}
        decodes, prefills = [], []
        for r in self.running:
            if r.num_generated >= r.params.max_tokens:
                continue  # its last token is on its way to the host
            pending = r.num_tokens - r.num_cached
            if pending == 1:
                decodes.append(r)
            elif pending > 1:
                prefills.append(r)
        self._snapshot_after = []
        for req in decodes + prefills:
            n = min(req.num_tokens - req.num_cached, budget)
            if n == 0 or len(lanes) == self.sizes.max_batch_size:
                break
            n = self._to_boundary(req, n)
            lanes.append((req, n))
            budget -= n
        if self.drafter is not None:  # leftover budget goes to drafts, never past max_tokens
            for i, (req, _) in enumerate(lanes[:len(decodes)]):
                k = min(self.drafter.max_draft_tokens, req.params.max_tokens - len(req.output) - 1, budget)
                if k > 0:
                    room[i] = k
                    budget -= k
        while self.waiting and budget > 0 and len(lanes) < self.sizes.max_batch_size and self.pools.slots.num_free:
            req = self.waiting[0]
            need = self._pages_for(len(req.prompt) + req.params.max_tokens)
            hit = Hit(0, [])
            if self.prefix is not None:
                if not req.keys:
                    req.keys = page_digests(req.prompt, self.sizes.page_size)
                hit = self.prefix.lookup(req.prompt, req.keys)
            if need - len(hit.pages) > self.pools.pages.num_free_after_sharing(hit.pages):
                break  # waits until running requests free their pages
            self.waiting.popleft()
            req.slot = self.pools.slots.allocate()[0]
            self.pools.pages.share(hit.pages)
            req.pages = hit.pages + (self.pools.pages.allocate(need - len(hit.pages)) if need > len(hit.pages) else [])
            if self.prefix is not None:
                self.prefix.admit(hit, req.slot, req.pages)
                self.prefix.count(len(req.prompt), hit)
                req.num_cached = req.num_cached_tokens = hit.position
                req.num_keyed = len(hit.pages)
            self.running.append(req)
            n = self._to_boundary(req, min(len(req.prompt) - req.num_cached, budget))
            lanes.append((req, n))
            budget -= n
        return lanes, room

    def _to_boundary(self, req: Request, n: int) -> int:
        """``n`` new tokens for ``req``'s lane, cut at the next prefill snapshot boundary (whose
        snapshot the step then takes) when prefix caching keeps per-slot state."""
        if self.prefix is None or req.num_cached >= len(req.prompt):
            return n
        boundary = self.prefix.next_boundary(req, req.num_cached)
        if boundary is not None and boundary <= req.num_cached + n:
            self._snapshot_after.append((req, boundary))
            return boundary - req.num_cached
        return n

    # -- one step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Request]:
        """Run one step; returns the requests whose end the host learned in it."""
        t0 = time.perf_counter()
        overlap = self.async_scheduling and self.drafter is None
        finished = [] if overlap else self._read_back()  # a synchronous step schedules from every token
        lanes, room = self._schedule()
        if not lanes:
            in_flight = self._inflight is not None
            finished += self._read_back()
            if self.waiting and not in_flight:  # admission checks make this impossible; never spin silently
                raise RuntimeError(f"scheduler stalled: {len(self.waiting)} waiting, {self.pools.pages.num_free} "
                                   f"free pages, {self.pools.slots.num_free} free slots")
            return finished
        t1 = time.perf_counter()
        drafts = self._drafts(lanes, room)
        lane_inputs, device_tokens, offset = [], DeviceTokens(), 0
        for i, (req, n) in enumerate(lanes):
            tokens = req.new_tokens(n) if not req.pending else [0]  # a pending token comes from the device
            if req.pending:
                device_tokens.add(offset, req.pending_row)
            tokens = tokens + drafts[i].tokens if i in drafts else tokens
            lane_inputs.append(LaneInput(tokens, req.num_cached, req.slot, req.pages, accepted=req.accepted,
                                         verify=i in drafts))
            offset += len(tokens)
        t2 = time.perf_counter()
        logits = self.runner.run(lane_inputs, device_tokens.source(self._inflight))
        for req, position in self._snapshot_after:  # prefill chunks that ended at a snapshot boundary
            self.prefix.snapshot(req, position)
        t3 = time.perf_counter()
        self.num_steps += 1
        # logits hold logit_rows(lane_inputs): all rows of a verify lane, the last row of any other
        starts = [0]
        for lane in lane_inputs[:-1]:
            starts.append(starts[-1] + logit_row_count(lane))
        launched = self._choose(lanes, lane_inputs, starts, logits, drafts)
        if overlap:
            finished += self._read_back()  # the previous step's tokens, while the device runs this one
            self._inflight = launched
        else:
            self._inflight = launched
            finished += self._read_back(verify=(lanes, starts, logits, drafts))
        if self.prefix is not None:
            for req in self.running:
                self.prefix.register(req)
        t4 = time.perf_counter()
        self.timings.update(schedule=t1 - t0, draft=t2 - t1, run=t3 - t2)
        if self.checked:
            self.check_accounting()
        self.timings["post"] += time.perf_counter() - t4
        return finished

    def _choose(self, lanes, lane_inputs, starts, logits, drafts) -> _Launched | None:
        """Advance the cached counts of this step's lanes and choose, on the device, the next token
        of every non-verify lane whose sequence is now fully cached; start copying them to the host."""
        sampled, rows, params, counters = [], [], [], []
        for i, ((req, n), start) in enumerate(zip(lanes, starts)):
            req.accepted = 0
            if i in drafts:
                continue  # verify lanes are decided on the host (speculative acceptance rule)
            req.num_cached += n
            if req.num_cached < req.num_tokens:
                continue  # a prefill chunk: no token to choose yet
            req.pending_row = len(rows)
            sampled.append((req, len(rows)))
            rows.append(start)
            params.append(req.params)
            counters.append(req.num_generated)
            req.pending += 1
        if not rows:
            return None
        if len(rows) == logits.shape[0]:  # every row (a decode step): no index to copy
            chosen_from = logits
        else:
            chosen_from = logits[self.runner.to_device(rows)]
        tokens = sample_rows(chosen_from, params, [r.seed for r, _ in sampled], counters, self.runner.to_device)
        host = self._host_tokens[self.num_steps % 2][:len(rows)]
        host.copy_(tokens, non_blocking=host.is_pinned())
        ready = None
        if host.is_pinned():
            ready = torch.cuda.Event()
            ready.record()
        return _Launched(sampled, tokens, host, ready)

    def _read_back(self, verify=None) -> list[Request]:
        """Commit the tokens of the step in flight (and decide its verify lanes, for a synchronous
        step); returns the requests that finished."""
        launched, self._inflight = self._inflight, None
        finished, commits = [], []
        sampled, chosen = [], []
        if launched is not None:
            t0 = time.perf_counter()
            if launched.ready is not None:
                launched.ready.synchronize()
            sampled, chosen = launched.sampled, launched.host.tolist()
            self.timings["sync"] += time.perf_counter() - t0
        for req, row in sampled:
            if req.finished:
                continue  # stopped or aborted while this step was in flight: its token is dropped
            req.pending -= 1
            commits.append((req, [chosen[row]]))
        if verify is not None:
            lanes, starts, logits, drafts = verify
            rows = [r for i, start in enumerate(starts) if i in drafts
                    for r in range(start, start + 1 + len(drafts[i].tokens))]
            argmax = dict(zip(rows, logits[self.runner.to_device(rows)].argmax(-1).tolist())) if rows else {}
            for i, ((req, _), start) in enumerate(zip(lanes, starts)):
                if i not in drafts:
                    continue
                draft = drafts[i]
                span = range(start, start + 1 + len(draft.tokens))
                num_accepted, bonus = accept(logits[start:span.stop], draft, req.params, req.generator,
                                             [argmax[r] for r in span])
                req.num_cached += 1 + num_accepted
                req.accepted = 1 + num_accepted
                req.spec.add(SpecDecodingStats(1, len(draft.tokens), num_accepted))
                commits.append((req, draft.tokens[:num_accepted] + [bonus]))
        for req, new_tokens in commits:
            for token in new_tokens:
                req.output.append(token)
                reason = self._stop_reason(req, token)
                if reason:
                    self._finish(req, reason)
                    finished.append(req)
                    break
        return finished

    def check_accounting(self) -> None:
        """Every allocated slot belongs to exactly one running request, and back; every page's
        reference count is the number of running requests holding it (more than one only for a
        shared prefix page, with prefix caching), and unheld pages are free or cached."""
        slots = [r.slot for r in self.running]
        pages = [p for r in self.running for p in r.pages]
        problems = []
        if len(set(slots)) != len(slots) or set(slots) != self.pools.slots.used:
            problems.append(f"slots of running requests {sorted(slots)} != allocated {sorted(self.pools.slots.used)}")
        if any(len(set(r.pages)) != len(r.pages) for r in self.running):
            problems.append("a running request holds a page twice")
        if self.prefix is None and len(set(pages)) != len(pages):
            problems.append("pages of running requests are shared without prefix caching")
        problems += self.pools.pages.check(pages)
        if problems:
            raise AssertionError("autodeploy checked mode: " + "; ".join(problems))

    def _drafts(self, lanes: list[tuple[Request, int]], room: dict[int, int]) -> dict[int, Draft]:
        """Lane index -> its drafts, for the decode lanes the scheduler gave room for drafts."""
        wanted = [(i, lanes[i][0], k) for i, k in room.items()]
        if not wanted:
            return {}
        proposed = self.drafter.propose([req for _, req, _ in wanted], [k for _, _, k in wanted])
        out = {}
        for (i, _, k), draft in zip(wanted, proposed):
            if len(draft.tokens) > k or any(not 0 <= t < self.vocab_size for t in draft.tokens):
                raise RuntimeError(f"drafter {type(self.drafter).__name__} proposed {draft.tokens} for at most {k} "
                                   f"tokens in [0, {self.vocab_size})")
            if draft.tokens:
                out[i] = draft
        return out

    def _stop_reason(self, req: Request, token: int) -> str | None:
        if token in req.params.stop_token_ids:
            return "stop"
        if token in self.eos_token_ids and not req.params.ignore_eos:
            return "stop"
        if len(req.output) >= req.params.max_tokens:
            return "length"
        return None
