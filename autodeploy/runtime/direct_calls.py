"""Eager CPU runs of a cached graph that call the ``autodeploy`` ops' Python bodies directly.

A ``torch.ops.autodeploy.*`` call in eager mode goes through torch's dispatcher and back into
Python (the custom op's autograd and view-tracking layers, then its CPU kernel): 15-40 us per call
on a 2-core x86 machine, against a few microseconds of arithmetic for a one-token RMSNorm. A
decode step of Gemma 3 270M makes ~170 such calls. On the CPU, without autograd (the engine runs
under ``torch.no_grad``), the Python body is what that dispatch ends in, so calling it directly
computes the same tensors.

:func:`direct_calls` returns a GraphModule over a node-for-node copy of the same graph (same
nodes, names, order and arguments; parameters and buffers shared, not copied) in which each
``autodeploy`` op node calls its Python body. The graph the transforms built stays as it is:
compiled and CUDA-graph paths, and anything that reads the graph, see the ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx import Graph, GraphModule

try:  # torch's registry of custom ops by name (private): without it every op stays a dispatched call
    from torch._library.custom_ops import OPDEFS
except ImportError:
    OPDEFS = {}

__all__ = ["direct_calls", "python_body"]


def python_body(target: object) -> Callable | None:
    """The Python function an ``autodeploy`` custom op (``torch.library.custom_op``) runs, or None
    for any other call target (and where this torch version does not expose it: the node then
    keeps its dispatched call, which computes the same)."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "autodeploy":
        return None
    opdef = OPDEFS.get(target._schema.name)
    return getattr(opdef, "_init_fn", None)


def direct_calls(gm: GraphModule) -> GraphModule:
    """``gm``'s graph with every ``autodeploy`` op node calling its Python body (see the module
    docstring); for eager runs on the CPU without autograd."""
    graph = Graph()
    graph._codegen = gm.graph._codegen
    graph.output(graph.graph_copy(gm.graph, {}))
    for node in graph.nodes:
        body = python_body(node.target) if node.op == "call_function" else None
        if body is not None:
            node.target = body
    direct = GraphModule(gm, graph, class_name="DirectCallsGraphModule")
    direct.meta.update(gm.meta)
    return direct
