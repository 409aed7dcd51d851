"""The engine: continuous batching with chunked prefill over one cached graph.

Each ``step()`` picks lanes under a token budget (decodes first, then prefill chunks of running
requests, then newly admitted requests), writes the raw inputs, runs the graph once, and samples
the next token of every lane whose sequence is fully in the cache. Admission reserves a slot and
the full-attention pages for the request's whole length (prompt + max_tokens), so a running
request never runs out of pages; requests that do not fit yet wait.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch.fx import GraphModule

from autodeploy.cache_spec import CacheSpec
from autodeploy.fx_utils import placeholder_names
from autodeploy.runtime.batch import BatchInputs, LaneInput
from autodeploy.runtime.pools import CachePools, PoolSizes
from autodeploy.runtime.sampling import SamplingParams, sample

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
    generator: torch.Generator | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Runs a cached GraphModule. ``add_request`` validates; ``step`` advances every request."""

    def __init__(self, gm: GraphModule, sizes: PoolSizes, vocab_size: int, eos_token_ids: Iterable[int] = (),
                 device: torch.device | str = "cpu"):
        self.gm, self.sizes, self.vocab_size = gm, sizes, vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        specs: list[CacheSpec] = gm.meta.get("autodeploy_caches", [])
        self.pools = CachePools(specs, sizes, device)
        self.inputs = BatchInputs(sizes.max_batch_size, sizes.max_num_tokens, sizes.max_pages_per_seq, device)
        self.input_names = placeholder_names(gm)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self.num_steps = 0

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

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.sizes.page_size) if self.pools.pages.capacity else 0

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        if req in self.running:
            self.running.remove(req)
            self.pools.slots.free([req.slot])
            self.pools.pages.free(req.pages)
            req.slot, req.pages = 0, []

    # -- scheduling ------------------------------------------------------------------------------
    def _schedule(self) -> list[tuple[Request, int]]:
        budget, lanes = self.sizes.max_num_tokens, []
        decodes = [r for r in self.running if len(r.tokens) - r.num_cached == 1]
        prefills = [r for r in self.running if len(r.tokens) - r.num_cached > 1]
        for req in decodes + prefills:
            n = min(len(req.tokens) - req.num_cached, budget)
            if n == 0 or len(lanes) == self.sizes.max_batch_size:
                break
            lanes.append((req, n))
            budget -= n
        while self.waiting and budget > 0 and len(lanes) < self.sizes.max_batch_size and self.pools.slots.num_free:
            req = self.waiting[0]
            need = self._pages_for(len(req.prompt) + req.params.max_tokens)
            if need > self.pools.pages.num_free:
                break  # waits until running requests free their pages
            self.waiting.popleft()
            req.slot = self.pools.slots.allocate()[0]
            req.pages = self.pools.pages.allocate(need) if need else []
            self.running.append(req)
            n = min(len(req.prompt), budget)
            lanes.append((req, n))
            budget -= n
        return lanes

    # -- one step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Request]:
        """Run one step; returns the requests that finished in it."""
        lanes = self._schedule()
        if not lanes:
            if self.waiting:  # admission checks make this impossible; never spin silently
                raise RuntimeError(f"scheduler stalled: {len(self.waiting)} waiting, {self.pools.pages.num_free} "
                                   f"free pages, {self.pools.slots.num_free} free slots")
            return []
        by_name = self.inputs.fill([
            LaneInput(req.tokens[req.num_cached:req.num_cached + n], req.num_cached, req.slot, req.pages)
            for req, n in lanes
        ])
        by_name.update(self.pools.tensors)
        logits = self.gm(*[by_name[name] for name in self.input_names])
        self.num_steps += 1
        finished, offset = [], 0
        for req, n in lanes:
            offset += n
            req.num_cached += n
            if req.num_cached < len(req.tokens):
                continue  # a prefill chunk: no token to sample yet
            token = sample(logits[0, offset - 1], req.params, req.generator)
            req.output.append(token)
            reason = None
            if token in req.params.stop_token_ids:
                reason = "stop"
            elif token in self.eos_token_ids and not req.params.ignore_eos:
                reason = "stop"
            elif len(req.output) >= req.params.max_tokens:
                reason = "length"
            if reason:
                self._finish(req, reason)
                finished.append(req)
        return finished
