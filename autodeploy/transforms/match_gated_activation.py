"""match_gated_activation: ``act(gate) * up`` -> ``autodeploy::gated_activation(gate, up, act)``.

Matches SwiGLU (``silu(g) * u``) and GeGLU (``gelu(g) * u``, exact or tanh) where both operands
are activations of the same shape (the gate/up projections of an MLP, or the two halves of a fused
gate/up GEMM), and the squared ReLU of NemotronH MLPs (``square(relu(x))`` -> ``gated_activation(x,
None, "relu2")``, two kernels -> one). Run after ``match_rms_norm``: the ``x * silu(gate)`` of a
gated RMSNorm belongs to the norm.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from autodeploy.transforms.base import Transform, TransformInfo

aten = torch.ops.aten
GATED_ACTIVATION = torch.ops.autodeploy.gated_activation.default


def _activation(node) -> str | None:
    if not (isinstance(node, Node) and node.op == "call_function"):
        return None
    if node.target == aten.silu.default:
        return "silu"
    if node.target == aten.gelu.default:
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return "gelu_tanh" if approximate == "tanh" else "gelu"
    return None


def _squared(node: Node) -> bool:
    return node.target == aten.square.default or (node.target == aten.pow.Tensor_Scalar and node.args[1] == 2)


class MatchGatedActivation(Transform):
    name = "match_gated_activation"

    def apply(self, gm: GraphModule, info: TransformInfo) -> None:
        graph = gm.graph
        for mul in [n for n in graph.nodes if n.op == "call_function" and n.target == aten.mul.Tensor]:
            a, b = mul.args[:2]
            for act_node, up in ((a, b), (b, a)):
                kind = _activation(act_node)
                if (kind is not None and isinstance(up, Node) and len(act_node.users) == 1
                        and act_node.args[0].meta["val"].shape == up.meta["val"].shape == mul.meta["val"].shape
                        and act_node.meta["val"].dtype == up.meta["val"].dtype):
                    with graph.inserting_before(mul):
                        new = graph.call_function(GATED_ACTIVATION, (act_node.args[0], up, kind))
                    new.meta.update({k: v for k, v in mul.meta.items() if k in ("val", "nn_module_stack")})
                    mul.replace_all_uses_with(new)
                    info.num_matches += 1
                    info.details[kind] = info.details.get(kind, 0) + 1
                    break
        for square in [n for n in graph.nodes if n.op == "call_function" and _squared(n)]:
            relu = square.args[0]
            if not (isinstance(relu, Node) and relu.op == "call_function" and relu.target == aten.relu.default
                    and len(relu.users) == 1):
                continue
            with graph.inserting_before(square):
                new = graph.call_function(GATED_ACTIVATION, (relu.args[0], None, "relu2"))
            new.meta.update({k: v for k, v in square.meta.items() if k in ("val", "nn_module_stack")})
            square.replace_all_uses_with(new)
            info.num_matches += 1
            info.details["relu2"] = info.details.get("relu2", 0) + 1
        if info.num_matches:
            info.changed = True
