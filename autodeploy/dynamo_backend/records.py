"""The backend's name, the canonical ops it lowers, its options, and the record of every subgraph it
compiled (:data:`STATS`)."""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

import autodeploy.custom_ops  # noqa: F401  (registers the canonical ops)

logger = logging.getLogger("autodeploy.dynamo")
aten = torch.ops.aten
BACKEND_NAME = "autodeploy"
ATTENTION = torch.ops.autodeploy.attention.default
SSD_SCAN = torch.ops.autodeploy.ssd_scan.default
CAUSAL_CONV1D = torch.ops.autodeploy.causal_conv1d.default
CANONICAL = {ATTENTION: "attention", SSD_SCAN: "ssd_scan", CAUSAL_CONV1D: "causal_conv1d"}
DEFAULT_OPTIONS: dict[str, Any] = {
    "inductor": None,  # None: on, falling back to eager (with a warning) if inductor fails
    "match_attention": True,
    "ssm_backend": "auto",
    "probe_length": 4096,
    "inductor_config": None,
}


@dataclass
class GraphRecord:
    """What the backend did to one dynamo subgraph."""

    index: int
    num_nodes: int  # call_function nodes of the aten graph, before matching
    matched: collections.Counter = field(default_factory=collections.Counter)  # canonical op -> count
    implementations: collections.Counter = field(default_factory=collections.Counter)  # impl -> count
    unmatched: list[str] = field(default_factory=list)  # attention left as traced, with the reason
    windows: list[int] = field(default_factory=list)  # per matched attention: sliding window (0 = full)
    soft_caps: list[float] = field(default_factory=list)  # per matched attention: logit soft-cap (0 = off)
    unrouted_ssm: int = 0  # Mamba2 mixers traced through transformers' torch fallback
    dynamic: bool = False  # the graph has symbolic sizes
    inductor: bool = False

    def summary(self) -> str:
        ops = ", ".join(f"{name} x{n}" for name, n in sorted(self.matched.items())) or "none"
        impls = ", ".join(f"{name} x{n}" for name, n in sorted(self.implementations.items()))
        text = (f"graph {self.index}: {self.num_nodes} aten nodes{' (dynamic shapes)' if self.dynamic else ''}; "
                f"matched: {ops}{f' -> {impls}' if impls else ''}; "
                f"{'inductor' if self.inductor else 'eager'}")
        if self.unmatched:
            text += f"; {len(self.unmatched)} attention(s) left unmatched"
        if self.unrouted_ssm:
            text += (f"; {self.unrouted_ssm} Mamba2 mixer(s) traced through the torch fallback "
                     "(compile the module autodeploy.dynamo_backend.prepare(model) returns to match them)")
        return text


class Stats:
    """Counters over every subgraph this backend compiled since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.graphs: list[GraphRecord] = []

    def reset(self) -> None:
        self.graphs.clear()

    @property
    def num_graphs(self) -> int:
        return len(self.graphs)

    @property
    def matched(self) -> collections.Counter:
        return sum((g.matched for g in self.graphs), collections.Counter())

    @property
    def implementations(self) -> collections.Counter:
        return sum((g.implementations for g in self.graphs), collections.Counter())

    @property
    def unmatched(self) -> list[str]:
        return [line for g in self.graphs for line in g.unmatched]

    def __repr__(self) -> str:
        return (f"Stats(graphs={self.num_graphs}, matched={dict(self.matched)}, "
                f"implementations={dict(self.implementations)}, unmatched={len(self.unmatched)})")


STATS = Stats()
