"""A :class:`GraphView` drawn as self-contained SVG by hand (no matplotlib, no graphviz)."""

from __future__ import annotations

import html
from collections.abc import Sequence

from autodeploy.graph_view.view import GraphView, _dtype, _fmt_bytes

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
