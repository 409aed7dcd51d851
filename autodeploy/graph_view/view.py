"""The layer-level view of a graph: which canonical, cached and prepare ops each decoder layer
holds and the caches they read and write (:func:`graph_view`)."""

from __future__ import annotations

import collections
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from autodeploy.cache_spec import STEP_INPUTS, CacheSpec
from autodeploy.fx_utils import EXPORT_ROOT, op_kwargs
from autodeploy.graph_record import graph_record

FAMILY_LABEL = {"attention": "attention", "ssd_scan": "Mamba2 scan", "causal_conv1d": "Mamba2 conv"}
LAYER_RE = re.compile(r"^((?:.*\.)?(?:layers|layer|h|blocks|block)\.\d+)(?:\.|$)")
UNMATCHED_TARGETS = {"aten.scaled_dot_product_attention.default", "aten.softmax.int", "aten._softmax.default",
                     "aten._safe_softmax.default"}


def _op_name(node: Node) -> str | None:
    """``attention`` for ``autodeploy.attention.default``; None for anything not in our namespace."""
    target = str(node.target)
    if node.op != "call_function" or not target.startswith("autodeploy."):
        return None
    return target.removeprefix("autodeploy.").rsplit(".", 1)[0]


def _family(op: str) -> tuple[str, str | None]:
    """(op family, backend) of an autodeploy op name; backend None for a canonical op."""
    from autodeploy.backends import CACHED_OPS

    for family, by_backend in CACHED_OPS.items():
        for backend, entry in by_backend.items():
            if entry.op == op:
                return family, backend
    if op in CACHED_OPS:
        return op, None
    for family in CACHED_OPS:  # an op registered elsewhere (a new backend): go by its name
        if family in op:
            return family, op.split("_", 1)[0] if "cached" in op else None
    return op, None


def _module_path(node: Node) -> tuple[str, str, list[tuple[str, str]]]:
    """(innermost module path, its class name, [(path, class)] outermost first), export root removed."""
    stack = node.meta.get("nn_module_stack") or {}
    chain = []
    for path, cls in stack.values():
        cls_name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        if path.startswith(EXPORT_ROOT + "."):
            chain.append((path[len(EXPORT_ROOT) + 1:], cls_name))
    return (chain[-1][0], chain[-1][1], chain) if chain else ("", "", [])


def _layer_of(node: Node) -> str:
    path = _module_path(node)[0]
    m = LAYER_RE.match(path)
    if m:
        return m.group(1)
    if path:  # a module outside the decoder layers (embedding, final norm, head)
        return ""
    # cached ops inserted by a transform may carry no module stack: use what feeds them
    seen, frontier = {node}, list(node.all_input_nodes)
    for _ in range(4):
        nxt = []
        for n in frontier:
            if n in seen or n.op != "call_function":
                continue
            seen.add(n)
            m = LAYER_RE.match(_module_path(n)[0])
            if m:
                return m.group(1)
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return ""


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _dtype(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


@dataclass
class OpView:
    node: str
    op: str
    family: str
    backend: str | None
    window: int | None = None  # attention only: 0 full, W sliding
    caches: list[str] = field(default_factory=list)
    prepare: list[str] = field(default_factory=list)  # prepare nodes feeding it

    @property
    def cached(self) -> bool:
        return self.backend is not None

    @property
    def detail(self) -> str:
        if self.family == "attention":
            text = f"sliding window W={self.window}" if self.window else "full attention"
        else:
            text = FAMILY_LABEL.get(self.family, self.family)
        return f"{text}; replaces {self.family}" if self.cached else text


@dataclass
class LayerView:
    path: str
    cls: str = ""
    parts: list[str] = field(default_factory=list)  # classes of the layer's child modules
    ops: list[OpView] = field(default_factory=list)
    unmatched: int = 0  # SDPA / softmax nodes: attention no transform understood
    io: bool = False  # embedding / head, outside the decoder layers

    @property
    def kind(self) -> str:
        if self.io:
            return "io"
        fams = {o.family for o in self.ops}
        if fams & {"ssd_scan", "causal_conv1d"}:
            return "mamba"
        if self.unmatched:
            return "unmatched"
        windows = {o.window for o in self.ops if o.family == "attention"}
        if windows - {0, None}:
            return "swa"
        if windows:
            return "full"
        return "mlp"

    @property
    def description(self) -> str:
        kind = self.kind
        if kind == "io":
            return ", ".join(self.parts)
        text = {"mamba": "Mamba2", "full": "full attention", "mlp": "",
                "unmatched": "attention (not matched: runs uncached)"}.get(kind)
        if kind == "swa":
            windows = sorted({o.window for o in self.ops if o.window})
            text = "sliding-window attention " + ", ".join(f"W={w}" for w in windows)
        mlp = any(re.search(r"MLP|MoE|Expert|FeedForward|FFN", p) for p in self.parts)
        if mlp and text:
            text += " + MLP"
        return text or ("MLP" if mlp else ", ".join(self.parts) or self.cls or "no cached op")


@dataclass
class PrepareView:
    node: str
    op: str
    inputs: list[str]
    feeds: list[str]
    window: int | None = None  # attention prepare: 0 full, W sliding
    page_size: int | None = None
    ring_pages: int | None = None
    checks: list[str] = field(default_factory=list)  # checked mode: range checks on the way to the ops

    @property
    def detail(self) -> str:
        if self.window is None:
            text = "per-lane SSM/conv metadata" if "ssm" in self.op else ""
        elif self.window:
            text = f"W={self.window}: ring of {self.ring_pages} pages x {self.page_size} per slot"
        else:
            text = f"full: paged, {self.page_size} tokens per page"
        return text + ("; range-checked" if self.checks else "")


@dataclass
class CacheView:
    name: str
    pool: str
    kind: str
    shape: tuple[int, ...] | None  # allocated shape for the configured sizes (None: sizes unknown)
    unit_shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int | None
    users: list[str] = field(default_factory=list)

    @property
    def shape_text(self) -> str:
        if self.shape is not None:
            return "[" + ", ".join(map(str, self.shape)) + "]"
        lead = "pages, page_size" if self.kind == "kv" else "slots"
        return "[" + ", ".join([lead, *map(str, self.unit_shape)]) + "]"


@dataclass
class GraphView:
    """The layer-level view of one graph (see module docstring)."""

    title: str
    layers: list[LayerView]
    prepares: list[PrepareView]
    caches: list[CacheView]
    inputs: list[str]
    backends: dict[str, str]
    sizes: Any = None

    def ops(self) -> list[OpView]:
        return [o for layer in self.layers for o in layer.ops]

    def op_counts(self) -> collections.Counter:
        return collections.Counter(o.op for o in self.ops())

    def pool_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.caches:
            if c.nbytes is not None:
                out[c.pool] = out.get(c.pool, 0) + c.nbytes
        return out

    def to_networkx(self) -> nx.DiGraph:
        """Nodes: layers (kind, label), ops, prepare nodes, caches; edges: layer order ("next"),
        layer -> op ("contains"), prepare -> op ("feeds"), cache -> op ("cache")."""
        g = nx.DiGraph(title=self.title)
        prev = None
        for layer in self.layers:
            g.add_node(layer.path, type="layer", kind=layer.kind, label=layer.description)
            if prev is not None:
                g.add_edge(prev, layer.path, type="next")
            prev = layer.path
            for op in layer.ops:
                g.add_node(op.node, type="op", kind="cached" if op.cached else "op", label=op.op,
                           detail=op.detail, layer=layer.path)
                g.add_edge(layer.path, op.node, type="contains")
        for p in self.prepares:
            g.add_node(p.node, type="prepare", kind="prepare", label=p.op, detail=p.detail)
            for target in p.feeds:
                g.add_edge(p.node, target, type="feeds")
        for c in self.caches:
            g.add_node(c.name, type="cache", kind="cache", label=c.name, pool=c.pool, shape=c.shape_text,
                       dtype=_dtype(c.dtype), nbytes=c.nbytes or 0)
            for user in c.users:
                g.add_edge(c.name, user, type="cache")
        return g


def graph_view(gm: GraphModule, sizes: Any = None, title: str = "") -> GraphView:
    """The layer-level view of ``gm``. ``sizes`` (a ``runtime.pools.PoolSizes``) gives the caches'
    allocated shapes and bytes; without it they are per page / per slot."""
    from autodeploy.runtime.pools import cache_shape

    record = graph_record(gm)
    specs: dict[str, CacheSpec] = {s.name: s for s in record.caches}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    layers: dict[str, LayerView] = {}
    pre: list[tuple[str, str]] = []
    post: list[tuple[str, str]] = []
    prepares: list[PrepareView] = []
    cache_users: dict[str, list[str]] = collections.defaultdict(list)
    seen_layer = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        op = _op_name(node)
        if op is not None and op.startswith("prepare_"):
            view = PrepareView(node.name, op, [a.name for a in node.args if isinstance(a, Node)], [])
            if op == "prepare_attention_metadata":
                kw = op_kwargs(node)
                view.window, view.page_size, view.ring_pages = kw["window"], kw["page_size"], kw["ring_pages"]
            prepares.append(view)
            continue
        if op is not None and op.startswith("check_"):  # checked mode: range checks between prepare and ops
            continue
        layer_path = _layer_of(node)
        if not layer_path:
            path, cls, _ = _module_path(node)
            if path:
                entry = (path.split(".")[-1] if path.count(".") else path, cls)
                target = post if seen_layer else pre
                if entry not in target:
                    target.append(entry)
            continue
        seen_layer = True
        layer = layers.get(layer_path)
        if layer is None:
            layer = layers[layer_path] = LayerView(layer_path)
        _, _, chain = _module_path(node)
        for path, cls in chain:
            if path == layer_path:
                layer.cls = cls
            elif path.startswith(layer_path + ".") and path.count(".") == layer_path.count(".") + 1:
                if cls not in layer.parts:
                    layer.parts.append(cls)
        if op is None:
            if str(node.target) in UNMATCHED_TARGETS:
                layer.unmatched += 1
            continue
        family, backend = _family(op)
        kw = op_kwargs(node) if hasattr(node.target, "_schema") else {}
        window = kw.get("sliding_window", kw.get("window")) if family == "attention" else None
        view = OpView(node.name, op, family, backend, int(window) if window is not None else None)
        for arg in node.all_input_nodes:
            if arg.op == "placeholder" and (arg.target in specs or (not specs and arg.target not in STEP_INPUTS)):
                view.caches.append(arg.target)
                cache_users[arg.target].append(node.name)
        layer.ops.append(view)
    # which prepare node feeds which op: prepare -> getitem [-> check_* -> getitem] -> op
    by_name = {o.node: o for layer in layers.values() for o in layer.ops}
    nodes = {n.name: n for n in gm.graph.nodes}
    for prep in prepares:
        reached, stack = set(), list(nodes[prep.node].users)
        while stack:
            u = stack.pop()
            if u in reached:
                continue
            reached.add(u)
            name = _op_name(u)
            if u.target is operator.getitem or (name or "").startswith("check_"):
                stack.extend(u.users)
                if name and name not in prep.checks:
                    prep.checks.append(name)
        for u in gm.graph.nodes:  # graph order
            if u in reached and u.name in by_name:
                prep.feeds.append(u.name)
                by_name[u.name].prepare.append(prep.node)
    caches = []
    for name, spec in specs.items():
        shape = tuple(cache_shape(spec, sizes)) if sizes is not None else None
        nbytes = math.prod(shape) * spec.dtype.itemsize if shape is not None else None
        caches.append(CacheView(name, spec.pool, spec.kind, shape, tuple(spec.shape), spec.dtype, nbytes,
                                cache_users.get(name, [])))
    ordered = list(layers.values())
    if pre:
        ordered.insert(0, LayerView("embedding", parts=[f"{p} ({c})" for p, c in pre], io=True))
    if post:
        ordered.append(LayerView("head", parts=[f"{p} ({c})" for p, c in post], io=True))
    inputs = [n.target for n in placeholders if n.target not in specs]
    return GraphView(title, ordered, prepares, caches, inputs, record.backends, sizes)
