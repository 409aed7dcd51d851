"""The record of a cached graph: everything the runtime must know about it, in one typed value.

``export_model`` starts the record (:class:`ExportInfo`, the graph's inputs); every pass that
changes what the graph expects from the runtime replaces it with an updated copy (the record is
frozen): insert_cached_attention and insert_cached_ssm add caches, raw inputs and host halves and
record the page size, token budget and draft-token bound they built for; gather_logits records
that the graph returns only the rows read; ``build_cached_graph`` records the backends. It is kept
under one key, ``gm.meta["autodeploy"]`` (:data:`RECORD_KEY`), so whatever holds the GraphModule
(the runner, torch.compile, graph_view) finds it.

The runtime reads it and recomputes nothing the graph decided: the runner allocates the caches
from ``caches`` (each with its own sizes), passes ``inputs`` in order, builds the host halves of
``host_halves`` and reads ``logit_rows``; pool sizes that contradict the record (another page
size, a larger token budget or sequence length, more draft tokens) are refused with an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from torch.fx import GraphModule, Node

from autodeploy.cache_spec import STEP_INPUTS, CacheSpec
from autodeploy.fx_utils import graph_input, placeholder_names

RECORD_KEY = "autodeploy"  # gm.meta[RECORD_KEY]: the graph's GraphRecord


@dataclass(frozen=True)
class ExportInfo:
    """What ``export_model`` recorded about the export."""

    max_seq_len: int
    example_len: int
    routed_attention: int  # attention calls routed through the HF interface
    routed_mamba_modules: tuple[str, ...]  # modeling modules whose entry points were patched


@dataclass(frozen=True)
class HostHalfSpec:
    """One host half the graph's cached ops of ``plan_id`` need (``autodeploy.backends.HostHalf``):
    the family and backend whose table entry names its class, and the spec it is built from."""

    plan_id: int
    family: str
    backend: str
    spec: Hashable


@dataclass(frozen=True)
class GraphRecord:
    """What a cached graph expects from the runtime (see the module docstring).

    inputs: the graph's inputs in call order: raw step inputs (``cache_spec.STEP_INPUTS``) and
    caches. caches: one spec per cache input, with its own sizes. page_size: tokens per KV page the
    prepare nodes address (None: no paged cache). max_num_tokens: the step token budget the
    sliding-window rings were sized for (None: none sized). max_draft_tokens: draft tokens a verify
    lane may carry, as the replay buffers and the gathered rows allow (None: the graph sets no
    bound). logit_rows: the graph returns only the rows the engine reads (1 + max_draft_tokens per
    lane at most), lane after lane. backend_choice: (op family, backend) pairs chosen.
    """

    inputs: tuple[str, ...]
    export: ExportInfo | None = None
    caches: tuple[CacheSpec, ...] = ()
    host_halves: tuple[HostHalfSpec, ...] = ()
    page_size: int | None = None
    max_num_tokens: int | None = None
    max_draft_tokens: int | None = None
    logit_rows: bool = False
    backend_choice: tuple[tuple[str, str], ...] = ()

    @property
    def backends(self) -> dict[str, str]:
        """Op family -> the backend chosen for it (empty for a graph not built by build_cached_graph)."""
        return dict(self.backend_choice)

    @property
    def raw_inputs(self) -> tuple[str, ...]:
        """The inputs that are not caches: what ``BatchInputs.fill`` provides, in call order."""
        caches = {c.name for c in self.caches}
        return tuple(name for name in self.inputs if name not in caches)

    @property
    def hybrid(self) -> bool:
        """The graph keeps per-slot state (SSM, conv) besides, or instead of, KV caches."""
        return any(c.kind == "state" for c in self.caches)

    @property
    def max_seq_len(self) -> int | None:
        """The sequence length the graph was exported for (rope tables, which windows need rings)."""
        return self.export.max_seq_len if self.export is not None else None

    def check_graph(self, gm: GraphModule, provided: tuple[str, ...] = STEP_INPUTS) -> None:
        """ValueError if ``gm``'s inputs are not the ones recorded, or if an input that is not a cache
        is not among those the runtime ``provided``."""
        names = tuple(placeholder_names(gm))
        if names != self.inputs:
            raise ValueError(f"the graph's inputs {list(names)} differ from its record's {list(self.inputs)}: a "
                             "pass changed the graph's inputs without recording them (graph_record.add_input and "
                             "add_cache do both)")
        unknown = [n for n in self.raw_inputs if n not in provided]
        if unknown:
            raise ValueError(f"the graph takes inputs {unknown} that are neither caches nor step inputs "
                             f"{list(provided)}")

    def check_sizes(self, sizes: Any, max_draft_tokens: int | None = None) -> None:
        """ValueError naming the option if ``sizes`` (a PoolSizes) or ``max_draft_tokens``
        contradict what the graph was built for."""
        if self.page_size is not None and sizes.page_size != self.page_size:
            raise ValueError(f"page_size {sizes.page_size} differs from the graph's {self.page_size} (its prepare "
                             "nodes address pages of that size): build the graph and the pools with one page_size")
        if self.max_num_tokens is not None and sizes.max_num_tokens > self.max_num_tokens:
            raise ValueError(f"max_num_tokens {sizes.max_num_tokens} exceeds the graph's {self.max_num_tokens} (its "
                             "sliding-window rings hold that many new tokens per step): rebuild the graph with the "
                             "larger budget or lower max_num_tokens")
        if self.max_seq_len is not None and sizes.max_seq_len > self.max_seq_len:
            raise ValueError(f"max_seq_len {sizes.max_seq_len} exceeds the {self.max_seq_len} the graph was exported "
                             "for (its rope tables and ring choices): rebuild the graph or lower max_seq_len")
        if max_draft_tokens and self.max_draft_tokens is not None and max_draft_tokens > self.max_draft_tokens:
            raise ValueError(f"{max_draft_tokens} draft tokens per step exceed the graph's {self.max_draft_tokens} "
                             "(its replay buffers and gathered rows): rebuild the graph with num_speculative_tokens "
                             f"{max_draft_tokens}")


def graph_record(gm: GraphModule) -> GraphRecord:
    """``gm``'s record; for a graph that has none yet (not from export_model), a record of its
    current inputs."""
    record = gm.meta.get(RECORD_KEY)
    if record is None:
        return GraphRecord(tuple(placeholder_names(gm)))
    if not isinstance(record, GraphRecord):
        raise TypeError(f"the graph's meta holds a {type(record).__name__} under {RECORD_KEY!r}, not a GraphRecord")
    return record


def update_record(gm: GraphModule, **changes: Any) -> GraphRecord:
    """Replace ``gm``'s record by a copy with ``changes``; returns the new record."""
    record = gm.meta[RECORD_KEY] = dataclasses.replace(graph_record(gm), **changes)
    return record


def record_bound(gm: GraphModule, field: str, value: int, what: str) -> None:
    """Record a size the graph is built for; ValueError if a pass before built for another."""
    recorded = getattr(graph_record(gm), field)
    if recorded is not None and recorded != value:
        raise ValueError(f"{what}: {field} {value} differs from the {recorded} an earlier pass built the graph for")
    update_record(gm, **{field: value})


def add_input(gm: GraphModule, name: str) -> Node:
    """The graph input ``name`` (a raw step input), added and recorded if missing."""
    node = graph_input(gm, name)
    record = graph_record(gm)
    if name not in record.inputs:
        update_record(gm, inputs=tuple(placeholder_names(gm)))
    return node


def add_cache(gm: GraphModule, spec: CacheSpec) -> Node:
    """A new cache input of ``spec``, added to the graph and recorded."""
    record = graph_record(gm)
    if spec.name in record.inputs:
        raise ValueError(f"the graph already has an input called {spec.name!r}")
    node = graph_input(gm, spec.name)
    update_record(gm, inputs=tuple(placeholder_names(gm)), caches=(*record.caches, spec))
    return node


def record_backends(gm: GraphModule, chosen: Mapping[str, str]) -> GraphRecord:
    """Record the backends chosen per op family."""
    return update_record(gm, backend_choice=tuple(chosen.items()))


__all__ = ["RECORD_KEY", "ExportInfo", "HostHalfSpec", "GraphRecord", "graph_record", "update_record", "add_input",
           "add_cache", "record_bound", "record_backends"]
