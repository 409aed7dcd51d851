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

from autodeploy.graph_view.files import _write_views, write_views
from autodeploy.graph_view.summary import summarize
from autodeploy.graph_view.svg import render_svg
from autodeploy.graph_view.view import GraphView, graph_view

__all__ = ["GraphView", "graph_view", "render_svg", "summarize", "write_views", "_write_views"]
