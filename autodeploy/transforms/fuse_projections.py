"""fuse_projections: linears that read the same input become one GEMM and a split.

Before::

    q = linear(h, Wq); k = linear(h, Wk); v = linear(h, Wv)        # three GEMMs reading h

After::

    qkv = linear(h, cat([Wq, Wk, Wv]))                               # one GEMM
    q, k, v = split_with_sizes(qkv, [nq, nk, nv], -1)

Same for an MLP's gate and up projections. The concatenated weight (and bias) is built once, here,
registered on the graph module, and the original parameters become views into it (so the model
they belong to keeps working and no second copy stays alive); the graph's references to them are
dropped when nothing else reads them. Linears whose weights differ in dtype or
device, or where only some have a bias, are left alone.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch.fx import GraphModule, Node

from autodeploy.fx_utils import attr_value
from autodeploy.transforms.base import Transform, TransformInfo

aten = torch.ops.aten
LINEAR = aten.linear.default


def _param(gm: GraphModule, node) -> torch.Tensor | None:
    """The tensor behind a get_attr node (a weight), else None."""
    if not (isinstance(node, Node) and node.op == "get_attr"):
        return None
    value = attr_value(gm, node.target)
    return value if isinstance(value, torch.Tensor) else None


def _concat_in_place(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One tensor holding ``tensors`` along dim 0; the originals become views of it, so the model
    that owns them (the user's module, which export shares) keeps no second copy alive."""
    fused = torch.cat([t.detach() for t in tensors], 0)
    offset = 0
    for t in tensors:
        t.data = fused[offset:offset + t.shape[0]]
        offset += t.shape[0]
    return fused


def _set_attr(gm: GraphModule, name: str, tensor: torch.Tensor) -> None:
    gm.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))


def _del_attr(gm: GraphModule, target: str) -> None:
    *path, leaf = target.split(".")
    owner = gm.get_submodule(".".join(path)) if path else gm
    delattr(owner, leaf)


class FuseProjections(Transform):
    name = "fuse_projections"

    def apply(self, gm: GraphModule, info: TransformInfo) -> None:
        graph = gm.graph
        groups: dict[Node, list[Node]] = defaultdict(list)
        for node in graph.nodes:
            if node.op == "call_function" and node.target == LINEAR and isinstance(node.args[0], Node):
                if _param(gm, node.args[1]) is not None:
                    groups[node.args[0]].append(node)
        fused_sizes = []
        for source, linears in groups.items():
            if len(linears) < 2:
                continue
            weights = [_param(gm, n.args[1]) for n in linears]
            biases = [n.args[2] if len(n.args) > 2 else n.kwargs.get("bias") for n in linears]
            has_bias = [b is not None for b in biases]
            if (len({(w.dtype, w.device, w.shape[1:]) for w in weights}) != 1 or any(w.dim() != 2 for w in weights)
                    or (any(has_bias) and not all(has_bias))):
                continue
            bias_tensors = [_param(gm, b) for b in biases] if all(has_bias) else None
            if bias_tensors is not None and any(b is None for b in bias_tensors):
                continue
            index = info.num_matches
            weight_name = f"fused_projection_{index}_weight"
            _set_attr(gm, weight_name, _concat_in_place(weights))
            if bias_tensors is not None:
                _set_attr(gm, f"fused_projection_{index}_bias", _concat_in_place(bias_tensors))
            sizes = [w.shape[0] for w in weights]
            first = min(linears, key=lambda n: list(graph.nodes).index(n))
            with graph.inserting_before(first):
                w_node = graph.get_attr(weight_name)
                b_node = graph.get_attr(f"fused_projection_{index}_bias") if bias_tensors is not None else None
                fused = graph.call_function(LINEAR, (source, w_node, b_node))
                parts = graph.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
                outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(linears))]
            val = first.meta.get("val")
            if val is not None:
                fused.meta["val"] = val.new_empty((*val.shape[:-1], sum(sizes)))
            fused.meta["nn_module_stack"] = first.meta.get("nn_module_stack", {})
            for old, new in zip(linears, outs):
                new.meta.update({k: v for k, v in old.meta.items() if k in ("val", "nn_module_stack")})
                old.replace_all_uses_with(new)
                graph.erase_node(old)
            fused_sizes.append(sizes)
            info.num_matches += 1
        if info.num_matches:
            info.changed = True
            self._drop_unused_attrs(gm)
        info.details["fused"] = [len(s) for s in fused_sizes]

    @staticmethod
    def _drop_unused_attrs(gm: GraphModule) -> None:
        """Remove get_attr nodes nobody reads and the tensors behind them (the unfused weights)."""
        graph = gm.graph
        for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
            target = node.target
            graph.erase_node(node)
            if not any(n.op == "get_attr" and n.target == target for n in graph.nodes):
                _del_attr(gm, target)
