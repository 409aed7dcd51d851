"""fold_constants: compute once what depends on weights alone, instead of every step.

The exported graph recomputes parameter-only expressions at every step, e.g. a Mamba2 mixer's
``A = -exp(A_log.float())`` (three kernels per layer per step). A node whose inputs are all weights,
buffers, constants or already-folded nodes is evaluated here, once, and becomes a buffer of the
graph module. Results that would be large copies (over ``max_elements``, e.g. a float32 cast of an
embedding matrix) stay in the graph, and so does what is computed from them, so folding never
doubles weight memory; results that alias an input (views such as ``squeeze(conv_weight)``) share
its storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from autodeploy.fx_utils import attr_value
from autodeploy.transforms.base import Transform, TransformConfig, TransformInfo


@dataclass
class FoldConstantsConfig(TransformConfig):
    max_elements: int = 1 << 20


def _aliases(result: torch.Tensor, inputs: list) -> bool:
    ptr = result.untyped_storage().data_ptr()
    return any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == ptr for t in inputs)


class FoldConstants(Transform):
    name = "fold_constants"
    Config = FoldConstantsConfig

    def apply(self, gm: GraphModule, info: TransformInfo) -> None:
        graph = gm.graph
        values: dict[Node, object] = {}
        folded: list[tuple[Node, torch.Tensor]] = []
        for node in graph.nodes:
            if node.op == "get_attr":
                values[node] = attr_value(gm, node.target)
                continue
            if node.op != "call_function" or any(n not in values for n in node.all_input_nodes):
                continue
            target = node.target
            if (not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable
                    or torch.Tag.nondeterministic_seeded in target.tags):
                continue  # only functional, deterministic ops: nothing that writes or draws
            args = torch.fx.node.map_arg(node.args, lambda n: values[n])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: values[n])
            with torch.no_grad():
                result = node.target(*args, **kwargs)
            if not isinstance(result, torch.Tensor):
                continue
            inputs = [values[n] for n in node.all_input_nodes]
            if result.numel() <= self.config.max_elements or _aliases(result, inputs):
                values[node] = result  # a constant now: its users may fold too
                folded.append((node, result))
        replaced, inner = 0, {node for node, _ in folded}
        for node, result in folded:
            if not node.users or all(user in inner for user in node.users):
                continue  # only the outermost folded node of a chain needs a buffer
            name = f"folded_{replaced}"
            gm.register_buffer(name, result.detach())  # a view keeps sharing its weight's storage
            with graph.inserting_before(node):
                attr = graph.get_attr(name)
            attr.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack")})
            node.replace_all_uses_with(attr)
            replaced += 1
        info.num_matches = replaced
        info.details["evaluated"] = len(folded)
        if replaced:
            info.changed = True
            graph.eliminate_dead_code()
