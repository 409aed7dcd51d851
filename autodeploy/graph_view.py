"""Layer-level views of a graph before and after the transforms: a text summary and pictures.

A view groups the graph's nodes by the decoder layer (``...layers.N``) whose module produced them
and keeps only what the transforms act on: the canonical ops (attention with its window, Mamba2
scan and conv), the cached ops that replace them, the prepare nodes that feed those, and the cache
tensors each cached op reads and writes. It is a networkx graph (:meth:`GraphView.to_networkx`)
drawn as self-contained SVG by hand (no matplotlib, no graphviz)::

    from autodeploy.graph_view import summarize, write_views

    print(summarize(llm))                       # what each transform did, caches, backends
    write_views("hybrid", "graphs/")            # graphs/hybrid_before.svg, _after.svg, .html, _summary.txt
"""

from __future__ import annotations

import collections
import html
import math
import operator
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from autodeploy.cache_spec import STEP_INPUTS, CacheSpec
from autodeploy.fx_utils import EXPORT_ROOT, op_kwargs

__all__ = ["GraphView", "graph_view", "render_svg", "summarize", "write_views"]

# kind -> (legend text, fill, stroke)
STYLE = {
    "mamba": ("Mamba2 (SSM) layer", "#d5e8d4", "#82b366"),
    "swa": ("sliding-window attention layer", "#ffe6cc", "#d79b00"),
    "full": ("full attention layer", "#dae8fc", "#6c8ebf"),
    "unmatched": ("attention left uncached", "#f8cecc", "#b85450"),
    "mlp": ("MLP / other layer", "#f5f5f5", "#9e9e9e"),
    "io": ("embedding / head", "#eeeeee", "#bdbdbd"),
    "op": ("canonical op", "#ffffff", "#555555"),
    "cached": ("cached op", "#ffffff", "#1b5e20"),
    "prepare": ("prepare node", "#e1d5e7", "#9673a6"),
    "cache": ("cache tensor", "#fff2cc", "#d6b656"),
}
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
        for backend, (_, name) in by_backend.items():
            if name == op:
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

    specs: dict[str, CacheSpec] = {s.name: s for s in gm.meta.get("autodeploy_caches", [])}
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
    return GraphView(title, ordered, prepares, caches, inputs, dict(gm.meta.get("autodeploy_backends", {})), sizes)


# -- text summary ----------------------------------------------------------------------------------


def _unwrap(gm_or_llm: Any):
    """(graph, transform infos, pool sizes) of a GraphModule or an LLM."""
    if isinstance(gm_or_llm, GraphModule):
        return gm_or_llm, None, None
    gm = getattr(gm_or_llm, "gm", None)
    if not isinstance(gm, GraphModule):
        raise TypeError(f"expected a GraphModule or an autodeploy.LLM, got {type(gm_or_llm).__name__}")
    return gm, getattr(gm_or_llm, "transform_infos", None), gm_or_llm.engine.pools.sizes


def summarize(gm_or_llm: Any, infos: Sequence[Any] | None = None, sizes: Any = None,
              before: GraphModule | None = None) -> str:
    """What the transforms made of a graph, as text: per transform its summary line, ops per family
    before -> after (with ``before``, the exported graph), each layer's kind and ops, the prepare
    nodes and the ops they feed, the caches (shapes, dtypes and bytes per pool for ``sizes``) and
    the backends. Takes a transformed GraphModule or an :class:`autodeploy.LLM` (which knows its
    transform infos and sizes)."""
    gm, llm_infos, llm_sizes = _unwrap(gm_or_llm)
    infos = infos if infos is not None else llm_infos
    sizes = sizes if sizes is not None else llm_sizes
    view = graph_view(gm, sizes)
    lines: list[str] = []
    if infos:
        lines.append("transforms:")
        for info in infos:
            lines.append("  " + info.summary())
            unmatched = info.details.get("unmatched") if isinstance(info.details, dict) else None
            if unmatched:
                lines.append(f"    left uncached: {unmatched}")
    after = view.op_counts()
    fam_after: dict[str, list[str]] = collections.defaultdict(list)
    for op, n in after.items():
        fam_after[_family(op)[0]].append(f"{op} x{n}")
    lines.append("ops" + (" (before -> after):" if before is not None else ":"))
    if before is not None:
        fam_before: dict[str, list[str]] = collections.defaultdict(list)
        for op, n in graph_view(before).op_counts().items():
            fam_before[_family(op)[0]].append(f"{op} x{n}")
        for fam in dict.fromkeys([*fam_before, *fam_after]):
            lines.append(f"  {', '.join(fam_before.get(fam, [])) or '-'} -> {', '.join(fam_after.get(fam, [])) or '-'}")
    else:
        for fam, ops in fam_after.items():
            lines.append("  " + ", ".join(ops))
    prep_counts = collections.Counter(p.op for p in view.prepares)
    if prep_counts:
        lines.append("  prepare nodes inserted: " + ", ".join(f"{k} x{v}" for k, v in prep_counts.items()))
    lines.append("layers:")
    width = max((len(layer.path) for layer in view.layers if not layer.io), default=10)
    for layer in view.layers:
        if layer.io:
            continue
        ops = ", ".join(o.op for o in layer.ops)
        caches = sorted({c for o in layer.ops for c in o.caches})
        lines.append((f"  {layer.path:<{width}}  {layer.description:<34} {ops}"
                      + (f"  [{', '.join(caches)}]" if caches else "")).rstrip())
    if view.prepares:
        lines.append("prepare nodes (-> the cached ops they feed):")
        layer_of = {o.node: layer.path for layer in view.layers for o in layer.ops}
        for p in view.prepares:
            feeds = ", ".join(f"{layer_of[f]}/{f}" for f in p.feeds)
            lines.append(f"  {p.node} ({p.detail}) <- {', '.join(p.inputs)}")
            lines.append(f"    -> {feeds}")
    if view.caches:
        if sizes is not None:
            lines.append(f"caches (max_batch_size={sizes.max_batch_size}, max_seq_len={sizes.max_seq_len}, "
                         f"page_size={sizes.page_size}, max_num_tokens={sizes.max_num_tokens}, "
                         f"{sizes.num_full_pages} full-attention pages):")
        else:
            lines.append("caches (per page for kind kv, per slot for state; sizes unknown):")
        pools: dict[str, list[CacheView]] = collections.defaultdict(list)
        for c in view.caches:
            pools[c.pool].append(c)
        totals = view.pool_bytes()
        for pool, members in pools.items():
            groups: dict[tuple, list[str]] = collections.defaultdict(list)
            for c in members:
                groups[(c.shape_text, c.dtype, c.nbytes)].append(c.name)
            desc = "; ".join(
                f"{', '.join(names)} {shape} {_dtype(dtype)}" + (f" ({_fmt_bytes(nb)} each)" if nb is not None else "")
                for (shape, dtype, nb), names in groups.items())
            total = f"{_fmt_bytes(totals[pool]):>10}" if pool in totals else ""
            lines.append(f"  {pool:<10} {total}  {desc}")
        if sizes is not None and getattr(sizes, "num_snapshots", 0):
            from autodeploy.runtime.pools import POOL_SNAPSHOTS, snapshot_bytes

            nbytes = snapshot_bytes(gm.meta.get("autodeploy_caches", []), sizes)
            totals = {**totals, POOL_SNAPSHOTS: nbytes}
            lines.append(f"  {POOL_SNAPSHOTS:<10} {_fmt_bytes(nbytes):>10}  {sizes.num_snapshots} prefix-cache snapshots "
                         f"({_fmt_bytes(nbytes // sizes.num_snapshots)} each: per-slot state, window keys, one page)")
        if totals:
            lines.append(f"  total      {_fmt_bytes(sum(totals.values())):>10}")
    if view.backends:
        lines.append("backends: " + ", ".join(f"{k}={v}" for k, v in view.backends.items()))
    return "\n".join(lines)


# -- SVG -------------------------------------------------------------------------------------------

FONT = 12
CHAR_W = 7.3  # monospace advance at FONT px, a little generous
LINE_H = 15
PAD = 8
GAP = 70  # between columns: where the edges run


def _text_w(lines: Sequence[str]) -> float:
    return max((len(s) for s in lines), default=0) * CHAR_W + 2 * PAD


def _box(x, y, w, h, kind, lines, tooltip, ident, bold_first=True) -> str:
    _, fill, stroke = STYLE[kind]
    out = [f'<g id="{html.escape(ident)}" class="{kind}"><title>{html.escape(tooltip)}</title>',
           f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="4" fill="{fill}" '
           f'stroke="{stroke}" stroke-width="{2 if kind == "cached" else 1.2}"/>']
    for i, line in enumerate(lines):
        weight = ' font-weight="bold"' if i == 0 and bold_first else ""
        out.append(f'<text x="{x + PAD:.1f}" y="{y + PAD + (i + 0.8) * LINE_H:.1f}"{weight}>{html.escape(line)}</text>')
    out.append("</g>")
    return "\n".join(out)


def _box_h(n_lines: int) -> float:
    return n_lines * LINE_H + 2 * PAD


def render_svg(view: GraphView, subtitle: Sequence[str] = ()) -> str:
    """The view as a self-contained SVG document: layers top to bottom as coloured bands holding
    their ops, prepare nodes on the left with an edge to each op they feed, cache tensors on the
    right with an edge to each op that reads and writes them."""
    g = view.to_networkx()
    op_h, cache_h, prep_h = _box_h(2), _box_h(2), _box_h(3)
    caches = {c.name: c for c in view.caches}
    cache_lines = {c.name: [f"{c.name}  ({c.pool})", f"{c.shape_text} {_dtype(c.dtype)}"
                            + (f"  {_fmt_bytes(c.nbytes)}" if c.nbytes is not None else "")] for c in view.caches}
    op_lines = {o.node: [o.op, o.detail] for o in view.ops()}
    prep_lines = {p.node: [p.op, p.detail, "<- " + ", ".join(i for i in p.inputs if i != "input_ids")]
                  for p in view.prepares}
    layer_labels = {layer.path: f"{layer.path}  ·  {layer.description}" + (f"  ({layer.cls})" if layer.cls else "")
                    for layer in view.layers}
    prep_w = max((_text_w(v) for v in prep_lines.values()), default=0)
    op_w = max((_text_w(v) for v in op_lines.values()), default=0)
    cache_w = max((_text_w(v) for v in cache_lines.values()), default=0)
    band_w = max(max(len(s) for s in layer_labels.values()) * CHAR_W + 2 * PAD, op_w + 4 * PAD, 320)
    margin = 20
    title_lines = [view.title, *subtitle]
    legend_kinds = [k for k in ("mamba", "swa", "full", "unmatched", "mlp", "cached", "op", "prepare", "cache")
                    if g.graph and any(d.get("kind") == k for _, d in g.nodes(data=True))]
    band_x = margin + (prep_w + GAP if view.prepares else 0)
    cache_x = band_x + band_w + GAP
    width = cache_x + (cache_w if view.caches else -GAP) + margin
    y = margin + len(title_lines) * (LINE_H + 3) + 6
    legend_y = y
    y += LINE_H + 18
    # layout: every node gets x, y, w, h on the networkx graph
    for layer in view.layers:
        top = y
        y += LINE_H + 2 * PAD
        for op in layer.ops:
            rows = max(1, len(op.caches))
            row_h = rows * (cache_h + 6) - 6
            oy = y + (row_h - op_h) / 2
            g.nodes[op.node].update(x=band_x + 2 * PAD, y=oy, w=op_w, h=op_h)
            for i, name in enumerate(op.caches):
                if name in g and "x" not in g.nodes[name]:
                    g.nodes[name].update(x=cache_x, y=y + i * (cache_h + 6), w=cache_w, h=cache_h)
            y += row_h + 8
        y += 0 if layer.ops else -2
        g.nodes[layer.path].update(x=band_x, y=top, w=band_w, h=y - top)
        y += 14
    next_free = 0.0
    for p in view.prepares:
        ys = [g.nodes[f]["y"] + g.nodes[f]["h"] / 2 for f in p.feeds if "y" in g.nodes[f]]
        py = max((min(ys) if ys else next_free) - prep_h / 2, next_free)
        g.nodes[p.node].update(x=margin, y=py, w=prep_w, h=prep_h)
        next_free = py + prep_h + 10
    height = max(y, next_free) + margin
    # draw
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" '
           f'font-size="{FONT}">',
           "<defs>"
           '<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker>'
           '<marker id="arrow-back" viewBox="0 0 10 10" refX="1" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto"><path d="M10,0 L0,5 L10,10 z" fill="#555"/></marker>'
           "</defs>",
           f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>']
    for i, line in enumerate(title_lines):
        weight = ' font-weight="bold" font-size="14"' if i == 0 else ""
        out.append(f'<text x="{margin}" y="{margin + (i + 0.8) * (LINE_H + 3):.1f}"{weight}>{html.escape(line)}</text>')
    lx = margin
    for kind in legend_kinds:
        text, fill, stroke = STYLE[kind]
        out.append(f'<rect x="{lx}" y="{legend_y}" width="14" height="14" fill="{fill}" stroke="{stroke}"/>'
                   f'<text x="{lx + 19}" y="{legend_y + 11.5}">{html.escape(text)}</text>')
        lx += 19 + len(text) * CHAR_W + 18
    width_needed = lx + margin
    out.append('<g class="edges" fill="none" stroke-width="1.2">')
    layers = [layer.path for layer in view.layers]
    for a, b in zip(layers, layers[1:]):
        na, nb = g.nodes[a], g.nodes[b]
        x = band_x + band_w / 2
        out.append(f'<line x1="{x:.1f}" y1="{na["y"] + na["h"]:.1f}" x2="{x:.1f}" y2="{nb["y"]:.1f}" '
                   f'stroke="#999" marker-end="url(#arrow)"/>')
    for src, dst, data in g.edges(data=True):
        if data["type"] not in ("feeds", "cache"):
            continue
        s, d = g.nodes[src], g.nodes[dst]
        if "x" not in s or "x" not in d:
            continue
        if data["type"] == "feeds":
            x1, y1 = s["x"] + s["w"], s["y"] + s["h"] / 2
            x2, y2 = d["x"], d["y"] + d["h"] / 2
            xm = x1 + GAP * 0.6
            out.append(f'<path d="M{x1:.1f},{y1:.1f} C{xm:.1f},{y1:.1f} {xm - 10:.1f},{y2:.1f} {band_x:.1f},{y2:.1f} '
                       f'L{x2:.1f},{y2:.1f}" stroke="{STYLE["prepare"][2]}" marker-end="url(#arrow)">'
                       f'<title>{html.escape(src)} feeds {html.escape(dst)}</title></path>')
        else:
            x1, y1 = d["x"] + d["w"], d["y"] + d["h"] / 2
            x2, y2 = s["x"], s["y"] + s["h"] / 2
            xm = (x1 + x2) / 2
            out.append(f'<path d="M{x1:.1f},{y1:.1f} C{xm:.1f},{y1:.1f} {xm:.1f},{y2:.1f} {x2:.1f},{y2:.1f}" '
                       f'stroke="{STYLE["cache"][2]}" marker-start="url(#arrow-back)" marker-end="url(#arrow)">'
                       f'<title>{html.escape(dst)} reads and writes {html.escape(src)}</title></path>')
    out.append("</g>")
    for layer in view.layers:
        n = g.nodes[layer.path]
        _, fill, stroke = STYLE[layer.kind]
        out.append(f'<g id="{html.escape(layer.path)}" class="layer {layer.kind}">'
                   f'<title>{html.escape(layer.path + ": " + layer.description + " " + ", ".join(layer.parts))}</title>'
                   f'<rect x="{n["x"]:.1f}" y="{n["y"]:.1f}" width="{n["w"]:.1f}" height="{n["h"]:.1f}" rx="6" '
                   f'fill="{fill}" stroke="{stroke}" stroke-width="1.5"/>'
                   f'<text x="{n["x"] + PAD:.1f}" y="{n["y"] + PAD + 0.8 * LINE_H:.1f}" font-weight="bold">'
                   f'{html.escape(layer_labels[layer.path])}</text></g>')
        for op in layer.ops:
            o = g.nodes[op.node]
            tip = f"{op.node}: {op.op} ({op.detail})" + (f", caches {', '.join(op.caches)}" if op.caches else "")
            out.append(_box(o["x"], o["y"], o["w"], o["h"], "cached" if op.cached else "op", op_lines[op.node], tip,
                            op.node))
    for p in view.prepares:
        n = g.nodes[p.node]
        out.append(_box(n["x"], n["y"], n["w"], n["h"], "prepare", prep_lines[p.node],
                        f"{p.node}: {p.op}({', '.join(p.inputs)}) feeds {', '.join(p.feeds)}", p.node))
    for name, c in caches.items():
        n = g.nodes[name]
        if "x" in n:
            out.append(_box(n["x"], n["y"], n["w"], n["h"], "cache", cache_lines[name],
                            f"{name}: pool {c.pool}, {c.shape_text} {_dtype(c.dtype)}, used by {', '.join(c.users)}",
                            name))
    out.append("</svg>")
    text = "\n".join(out)
    if width_needed > width:  # the legend is wider than the drawing
        text = text.replace(f'width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f}',
                            f'width="{width_needed:.0f}" height="{height:.0f}" viewBox="0 0 {width_needed:.0f}', 1)
    return text + "\n"


# -- files -----------------------------------------------------------------------------------------


def _model_name(model: Any) -> str:
    cls = type(model).__name__
    return re.sub(r"ForCausalLM$", "", cls).lower() or "model"


def write_views(model_or_llm: Any, out_dir: str | os.PathLike = "graphs", name: str | None = None,
                **config: Any) -> list[Path]:
    """Write the layer views of a model before and after the transforms, and the summary.

    ``model_or_llm``: an :class:`autodeploy.LLM`, a model (transformers or any causal LM), a zoo
    name or a checkpoint directory; ``config``: LLM options when one has to be built (default
    ``DeployConfig``'s). Writes ``<name>_before.svg``, ``<name>_after.svg``, ``<name>.html`` (both
    pictures and the summary in one page) and ``<name>_summary.txt`` under ``out_dir``; returns
    their paths. ``name`` defaults to the zoo name, the directory's name or the model class."""
    return _write_views(model_or_llm, out_dir, name, **config)[0]


def _write_views(model_or_llm: Any, out_dir: str | os.PathLike = "graphs", name: str | None = None,
                 **config: Any) -> tuple[list[Path], str]:
    """write_views, also returning the summary text."""
    from autodeploy.api import LLM
    from autodeploy.demo import load_model
    from autodeploy.export import export_model

    if isinstance(model_or_llm, LLM):
        if config:
            raise TypeError(f"LLM options {sorted(config)} are for building one; this LLM is already built")
        llm = model_or_llm
    else:
        source, loaded_name = load_model(model_or_llm)
        name = name or (loaded_name if isinstance(model_or_llm, (str, os.PathLike)) else None)
        llm = LLM(source, **config)
    name = name or _model_name(llm.model)
    before = export_model(llm.model, max_seq_len=llm.config.max_seq_len)
    sizes = llm.engine.pools.sizes
    label = f"{name} ({type(llm.model).__name__})"
    pipeline = " -> ".join(i.name for i in llm.transform_infos)
    before_view = graph_view(before, title=f"{label}: exported graph, before the transforms")
    counts = before_view.op_counts()
    before_sub = ["canonical ops: " + (", ".join(f"{k} x{v}" for k, v in counts.items()) or "none"),
                  f"next: {pipeline}"]
    after_view = graph_view(llm.gm, sizes, title=f"{label}: after {pipeline}")
    backends = ", ".join(f"{k}={v}" for k, v in after_view.backends.items())
    pools = after_view.pool_bytes()
    after_sub = [f"backends: {backends}; graph inputs: {', '.join(after_view.inputs)}",
                 f"caches for max_batch_size={sizes.max_batch_size}, max_seq_len={sizes.max_seq_len}, "
                 f"page_size={sizes.page_size}, max_num_tokens={sizes.max_num_tokens}: "
                 + ", ".join(f"{p} {_fmt_bytes(b)}" for p, b in pools.items())
                 + f" (total {_fmt_bytes(sum(pools.values()))})"]
    summary = f"model: {label}\n" + summarize(llm, before=before)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}_before.svg", out / f"{name}_after.svg", out / f"{name}.html", out / f"{name}_summary.txt"]
    svgs = [render_svg(before_view, before_sub), render_svg(after_view, after_sub)]
    paths[0].write_text(svgs[0])
    paths[1].write_text(svgs[1])
    page = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">',
            f"<title>autodeploy graph: {html.escape(label)}</title>",
            "<style>body{font-family:sans-serif;margin:20px} pre{background:#f7f7f7;padding:10px}</style>",
            "</head><body>", f"<h1>{html.escape(label)}</h1>", f"<pre>{html.escape(summary)}</pre>",
            "<h2>Before the transforms</h2>", svgs[0], "<h2>After the transforms</h2>", svgs[1], "</body></html>"]
    paths[2].write_text("\n".join(page) + "\n")
    paths[3].write_text(summary + "\n")
    return paths, summary
