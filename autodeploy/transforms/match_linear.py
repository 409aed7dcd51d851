"""match_linear: ``aten.linear(x, w, b)`` -> ``autodeploy::linear(x, w, b)``.

Before::

    y = aten.linear(x, weight, bias)          # cuBLAS at every row count

After::

    y = autodeploy.linear(x, weight, bias)    # a Triton GEMV for one row on CUDA, else F.linear

The op is the same function (``F.linear`` on the CPU and for several rows); the rewrite only gives
one-token steps the kernel that reads the weights at bandwidth (custom_ops/linear.py). Only linears
whose weight is a constant of the graph (a get_attr: a parameter) are rewritten: the kernel may load
its weights before the kernel before it has finished (``triton_pdl``), which is exact only for
weights no step writes; a weight computed in the graph keeps ``aten.linear``. It runs last, after
the transforms that look for ``aten.linear`` (projection fusion, tensor-parallel sharding, the
logits gather).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

import autodeploy.custom_ops.linear  # noqa: F401  (registers autodeploy::linear)
from autodeploy.transforms.base import Transform, TransformInfo

aten = torch.ops.aten
LINEAR = torch.ops.autodeploy.linear.default


class MatchLinear(Transform):
    name = "match_linear"

    def apply(self, gm: GraphModule, info: TransformInfo) -> None:
        for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.linear.default]:
            x, weight = node.args[:2]
            if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
                continue
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(LINEAR, (x, weight, bias))
            new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            info.num_matches += 1
        info.changed = bool(info.num_matches)
