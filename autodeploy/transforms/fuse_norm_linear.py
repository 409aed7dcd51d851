"""fuse_norm_linear: an RMSNorm whose only consumer is a linear layer becomes one op.

Before::

    h = autodeploy.rms_norm(x, w_norm, None, eps, 0, offset, cast_first, dtype)
    y = autodeploy.linear(h, W, b)
    (h, s) = autodeploy.fused_add_rms_norm(x, r, w_norm, eps, offset, cast_first, dtype)
    y = autodeploy.linear(h, W, b)

After::

    y = autodeploy.rms_norm_linear(x, w_norm, eps, offset, cast_first, dtype, W, b)
    (y, s) = autodeploy.fused_add_rms_norm_linear(x, r, w_norm, eps, offset, cast_first, dtype, W, b)

Only plain norms (no gate, no channel groups) whose normalised output feeds nothing but that
linear's input (``aten.linear`` or ``match_linear``'s op). The op is the pair on the CPU and for
several rows; at one row on CUDA it is one launch (custom_ops/norm_linear.py).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

import autodeploy.custom_ops.norm_linear  # noqa: F401  (registers the fused ops)
from autodeploy.transforms.base import Transform, TransformInfo

ops = torch.ops.autodeploy
RMS_NORM, FUSED_ADD = ops.rms_norm.default, ops.fused_add_rms_norm.default
LINEARS = (ops.linear.default, torch.ops.aten.linear.default)


def _sole_linear(node: Node) -> Node | None:
    """The linear layer that is ``node``'s only user, taking it as its input, else None."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    return user if user.target in LINEARS and user.args[0] is node and node not in user.args[1:] else None


class FuseNormLinear(Transform):
    name = "fuse_norm_linear"

    def apply(self, gm: GraphModule, info: TransformInfo) -> None:
        graph = gm.graph
        order = {n: i for i, n in enumerate(graph.nodes)}

        def defined_before(values, node: Node) -> bool:
            """The fused op goes where the norm was: its weights must exist there (a get_attr defined
            later, as projection fusion places them, moves up; it has no inputs)."""
            late = [v for v in values if isinstance(v, Node) and order[v] > order[node]]
            if any(v.op != "get_attr" for v in late):
                return False
            for v in late:
                node.prepend(v)
            return True

        for norm in [n for n in graph.nodes if n.op == "call_function" and n.target in (RMS_NORM, FUSED_ADD)]:
            if norm.target == RMS_NORM:
                x, w, gate, eps, group, offset, cast_first, dtype = norm.args
                lin = _sole_linear(norm)
                if gate is not None or group or lin is None or not defined_before(self._weights(lin), norm):
                    continue
                with graph.inserting_before(norm):
                    new = graph.call_function(ops.rms_norm_linear.default,
                                              (x, w, eps, offset, cast_first, dtype, *self._weights(lin)))
                new.meta.update({k: v for k, v in lin.meta.items() if k in ("val", "nn_module_stack")})
                lin.replace_all_uses_with(new)
                graph.erase_node(lin)
                graph.erase_node(norm)
                info.details["rms_norm"] = info.details.get("rms_norm", 0) + 1
            else:
                outs = {u.args[1]: u for u in norm.users if u.target == operator.getitem}
                normed = outs.get(0)
                lin = _sole_linear(normed) if normed is not None and len(outs) == len(norm.users) else None
                if lin is None or not defined_before(self._weights(lin), norm):
                    continue
                with graph.inserting_before(norm):
                    new = graph.call_function(ops.fused_add_rms_norm_linear.default, (*norm.args, *self._weights(lin)))
                    out = graph.call_function(operator.getitem, (new, 0))
                    total = graph.call_function(operator.getitem, (new, 1))
                out.meta.update({k: v for k, v in lin.meta.items() if k in ("val", "nn_module_stack")})
                if "val" in lin.meta and 1 in outs and "val" in outs[1].meta:
                    new.meta["val"] = (lin.meta["val"], outs[1].meta["val"])
                lin.replace_all_uses_with(out)
                if 1 in outs:
                    total.meta.update(outs[1].meta)
                    outs[1].replace_all_uses_with(total)
                for node in (lin, normed, outs.get(1)):
                    if node is not None:
                        graph.erase_node(node)
                graph.erase_node(norm)
                if not total.users:
                    graph.erase_node(total)
                info.details["fused_add_rms_norm"] = info.details.get("fused_add_rms_norm", 0) + 1
        info.num_matches = sum(info.details.values())
        info.changed = bool(info.num_matches)

    @staticmethod
    def _weights(lin: Node) -> tuple:
        return lin.args[1], lin.args[2] if len(lin.args) > 2 else None
