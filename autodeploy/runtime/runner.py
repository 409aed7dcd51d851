"""GraphRunner: one cached graph with its cache pools and input buffers; runs lanes.

The engine (and a draft model's drafter) hand it lanes; it writes the raw inputs, passes the
cache tensors by name, and returns the logits of the rows the engine reads (``batch.logit_rows``:
the last token of each lane, every token of a verify lane). Nothing derived is
computed here: the graph's prepare nodes do that. What the graph expects (its inputs in order, its
caches with their sizes, its host halves, whether it returns only the rows read) comes from its
record (``autodeploy.graph_record``); pool sizes that contradict it are refused.

Compile modes (AutoDeploy's names in brackets): ``eager`` (torch-simple) runs the GraphModule;
``inductor`` (torch-compile) runs ``torch.compile`` of it (cached ops stay opaque); ``cudagraph``
(torch-cudagraph) captures the graph once per token count in ``capture_sizes`` and replays it for
any step of at most that many tokens, padded with the reserved padding lane, which touches only
the null page and the null slot; ``inductor+cudagraph`` (torch-opt) captures the compiled graph.
The captured graph is the same graph, prepare nodes included, so replays derive every buffer
from the raw inputs of the step; nothing is prepared outside it.
"""

from __future__ import annotations

import time

import torch
from torch.fx import GraphModule

from autodeploy.backends import build_host_halves
from autodeploy.cache_spec import STEP_INPUTS
from autodeploy.graph_record import GraphRecord, graph_record
from autodeploy.runtime.batch import BatchInputs, LaneInput, logit_row_count, logit_rows
from autodeploy.runtime.poison import PoolPoisoner, poison_step
from autodeploy.runtime.pools import CachePools, PoolSizes

COMPILE_MODES = {"eager": "eager", "torch-simple": "eager", "inductor": "inductor", "torch-compile": "inductor",
                 "cudagraph": "cudagraph", "torch-cudagraph": "cudagraph", "inductor+cudagraph": "inductor+cudagraph",
                 "torch-opt": "inductor+cudagraph"}


def default_capture_sizes(max_batch_size: int, max_draft_tokens: int, max_num_tokens: int) -> list[int]:
    """Token counts to capture: powers of two up to a full decode/verify step of every lane."""
    top = min(max_batch_size * (1 + max_draft_tokens), max_num_tokens)
    sizes = {1 << i for i in range(top.bit_length()) if 1 << i <= top} | {top}
    return sorted(sizes)


def host_halves(record: GraphRecord, sizes: PoolSizes, device) -> list:
    """The host halves the graph's cached ops declare (autodeploy.backends.HostHalf), one per id:
    they run before every step, on every path (eager, warm-up, capture, replay)."""
    return build_host_halves(record, sizes.max_batch_size + 1, sizes.max_pages_per_seq, device)


class GraphRunner:
    step_inputs: tuple[str, ...] = STEP_INPUTS  # the inputs besides caches that a step provides (BatchInputs)

    def __init__(self, gm: GraphModule, sizes: PoolSizes, device: torch.device | str = "cpu",
                 compile_mode: str = "eager", capture_sizes: list[int] | None = None):
        self.gm, self.sizes = gm, sizes
        self.record = record = graph_record(gm)
        record.check_graph(gm, self.step_inputs)
        record.check_sizes(sizes)
        self.pools = CachePools(list(record.caches), sizes, device)
        self.inputs = BatchInputs(sizes.max_batch_size, sizes.max_num_tokens, sizes.max_pages_per_seq, device)
        self.input_names = list(record.inputs)
        self.timings: dict[str, float] = {"fill": 0.0, "plan": 0.0, "launch": 0.0}  # host seconds per part of run()
        self.gathers_rows = record.logit_rows  # the graph returns only those rows
        self.host_halves = host_halves(record, sizes, device)
        self.device = torch.device(device)
        # small index lists go to the device through pinned staging without a host sync
        self._index_host = torch.zeros(4 * (sizes.max_batch_size + 1) + sizes.max_num_tokens, dtype=torch.long,
                                       pin_memory=self.device.type == "cuda")
        self._index_used = 0
        self._index_free = torch.cuda.Event() if self.device.type == "cuda" else None
        self.num_runs = self.num_replays = 0
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {compile_mode!r} unknown; known: {sorted(COMPILE_MODES)}")
        self.mode = COMPILE_MODES[compile_mode]
        self.fn = torch.compile(gm, dynamic=True, fullgraph=True) if "inductor" in self.mode else gm
        if self.mode == "eager" and self.device.type == "cpu":  # the same graph, no custom-op dispatch
            from autodeploy.runtime.direct_calls import direct_calls

            self.fn = direct_calls(gm)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0
        self.capture_bytes = 0
        self.poison = False  # garble everything a step must not read before it runs (runtime/poison.py)
        self._pool_poisoner = None
        if "cudagraph" in self.mode:
            if not str(device).startswith("cuda"):
                raise ValueError(f"compile mode {compile_mode!r} captures CUDA graphs: it needs device 'cuda'")
            self.capture(capture_sizes or default_capture_sizes(sizes.max_batch_size, 0, sizes.max_num_tokens))

    def _plan(self, captured: bool) -> None:
        """Run the host halves of the graph's prepare work for the step just filled in."""
        for half in self.host_halves:
            half.plan(self.inputs.host, captured)

    def _args(self, by_name: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        by_name.update(self.pools.tensors)
        return [by_name[name] for name in self.input_names]

    @torch.no_grad()
    def capture(self, token_counts: list[int]) -> None:
        """Capture one CUDA graph per token count (largest first, one shared memory pool). Capture
        steps carry only the padding lane, so they write nothing but the null page and slot."""
        bad = [t for t in token_counts if not 1 <= t <= self.sizes.max_num_tokens]
        if bad:
            raise ValueError(f"capture sizes {bad} outside [1, max_num_tokens {self.sizes.max_num_tokens}]")
        start = time.perf_counter()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # so that the growth below is the graphs' pool, not freed temporaries
        reserved = torch.cuda.memory_reserved()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for count in sorted(set(token_counts), reverse=True):
            args = self._args(self.inputs.fill([], pad_to=count))
            self._plan(captured=True)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: compiles kernels, settles allocations
                    self.fn(*args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.fn(*args)
            self.graphs[count] = (graph, out)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        self.capture_bytes = torch.cuda.memory_reserved() - reserved  # the graphs' private pool, mostly
        self._pool = pool

    def to_device(self, values: list[int]) -> torch.Tensor:
        """``values`` as an int64 tensor on the device, copied from pinned staging without waiting
        for the device (the staging is a ring; it waits only when it wraps around)."""
        if self.device.type != "cuda":
            return torch.tensor(values, dtype=torch.long)
        n = len(values)
        if n > self._index_host.numel():
            raise ValueError(f"{n} indices exceed the staging buffer ({self._index_host.numel()})")
        if self._index_used + n > self._index_host.numel():
            self._index_free.synchronize()  # the copies out of the ring's start are done
            self._index_used = 0
        chunk = self._index_host[self._index_used:self._index_used + n]
        self._index_used += n
        chunk.copy_(torch.tensor(values, dtype=torch.long))
        out = chunk.to(self.device, non_blocking=True)
        self._index_free.record()
        return out

    def _write_device_tokens(self, source) -> None:
        """Input ids that the previous step chose on the device: a device copy, no host round trip."""
        tokens, rows, offsets = source
        ids = self.inputs.input_ids[0]
        n = len(rows)
        if rows == list(range(rows[0], rows[0] + n)) and offsets == list(range(offsets[0], offsets[0] + n)):
            ids[offsets[0]:offsets[0] + n].copy_(tokens[rows[0]:rows[0] + n])  # the steady decode state
        else:
            ids.index_copy_(0, self.to_device(offsets), tokens.index_select(0, self.to_device(rows)))

    @torch.no_grad()
    def run(self, lanes: list[LaneInput], device_tokens=None) -> torch.Tensor:
        """Run one step over ``lanes``; returns logits [rows, vocab] of ``logit_rows(lanes)``.
        ``device_tokens``: (tokens on the device, their rows, step offsets) to write into the input
        ids after the host's (``DeviceTokens.source``)."""
        tokens = sum(len(lane.tokens) for lane in lanes)
        rows = logit_rows(lanes)
        self.num_runs += 1
        size = min((s for s in self.graphs if s >= tokens), default=None)
        t0 = time.perf_counter()
        args = self._args(self.inputs.fill(lanes, pad_to=size))  # a captured graph reads these very buffers
        if device_tokens is not None:
            self._write_device_tokens(device_tokens)
        t1 = time.perf_counter()
        self._plan(captured=size is not None)
        self.inputs.copies_done()  # after the plans: their async host-to-device copies are covered too
        t2 = time.perf_counter()
        if self.poison:
            poison_step(self, lanes, dict(zip(self.input_names, args)))
        if size is None:
            out = self.fn(*args)
        else:
            out = self.graphs[size][1]
            if self.poison:
                if self._pool_poisoner is None:
                    self._pool_poisoner = PoolPoisoner(self._pool, out.device)
                self._pool_poisoner()
            self.graphs[size][0].replay()
            self.num_replays += 1
        self.timings["fill"] += t1 - t0
        self.timings["plan"] += t2 - t1
        self.timings["launch"] += time.perf_counter() - t2
        if self.gathers_rows:
            if len(rows) > out.shape[1]:  # a verify lane longer than the graph's 1 + K rows per lane
                raise ValueError(f"the step needs {len(rows)} rows of logits but the graph returns {out.shape[1]}: "
                                 "a verify lane carries more drafts than gather_logits' max_draft_tokens")
            logits = out[0, :len(rows)]
        else:
            logits = out[0, self.to_device(rows)]
        return logits.clone() if size is not None else logits

    def run_in_batches(self, lanes: list[LaneInput]) -> list[torch.Tensor]:
        """Run ``lanes`` in as many steps as the lane and token limits need (each lane must fit a
        step on its own); returns each lane's logits [its rows, vocab] (its last token; every token of
        a verify lane), in order."""
        out: list[torch.Tensor] = []
        start = 0
        while start < len(lanes):
            end, tokens = start, 0
            while (end < len(lanes) and end - start < self.sizes.max_batch_size
                   and tokens + len(lanes[end].tokens) <= self.sizes.max_num_tokens):
                tokens += len(lanes[end].tokens)
                end += 1
            if end == start:
                raise ValueError(f"a lane of {len(lanes[start].tokens)} tokens exceeds max_num_tokens "
                                 f"{self.sizes.max_num_tokens}")
            logits = self.run(lanes[start:end])
            offset = 0
            for lane in lanes[start:end]:
                n = logit_row_count(lane)
                out.append(logits[offset:offset + n])
                offset += n
            start = end
        return out
