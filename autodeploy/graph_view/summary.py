"""The text summary of a graph or engine: what each transform did, the ops per family before and
after, the prepare nodes, caches per pool and the backends (:func:`summarize`)."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from torch.fx import GraphModule

from autodeploy.graph_record import graph_record
from autodeploy.graph_view.view import CacheView, _dtype, _family, _fmt_bytes, graph_view


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
        for ops in fam_after.values():
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

            nbytes = snapshot_bytes(list(graph_record(gm).caches), sizes)
            totals = {**totals, POOL_SNAPSHOTS: nbytes}
            lines.append(f"  {POOL_SNAPSHOTS:<10} {_fmt_bytes(nbytes):>10}  {sizes.num_snapshots} prefix-cache "
                         f"snapshots ({_fmt_bytes(nbytes // sizes.num_snapshots)} each: per-slot state, window keys, "
                         "one page)")
        if totals:
            lines.append(f"  total      {_fmt_bytes(sum(totals.values())):>10}")
    if view.backends:
        lines.append("backends: " + ", ".join(f"{k}={v}" for k, v in view.backends.items()))
    return "\n".join(lines)
