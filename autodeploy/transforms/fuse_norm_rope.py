"""fuse_norm_rope: per-head q/k RMSNorms that feed only the rotary embedding become one op.

Before::

    qn = autodeploy.rms_norm(q, w_q, None, eps, 0, offset, cast_first, q.dtype)
    kn = autodeploy.rms_norm(k, w_k, None, eps, 0, offset, cast_first, k.dtype)
    (q2, k2) = autodeploy.rope(qn, kn, position_ids, cos, sin, token_dim)

After::

    (q2, k2) = autodeploy.rms_norm_rope(q, k, w_q, w_k, eps, offset, cast_first, position_ids, cos, sin, token_dim)

Gemma 3 normalises every query and key head before RoPE: three launches per attention layer
become one on CUDA (custom_ops/norm_rope.py). Both norms must be plain (no gate, no groups), agree
on eps and the weight convention, keep their input's dtype, and have the rope as their only user.
Matches ``match_rope``'s and ``match_rms_norm``'s ops, so it runs after both.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

import autodeploy.custom_ops.norm_rope  # noqa: F401  (registers the op)
from autodeploy.transforms.base import Transform, TransformInfo

ops = torch.ops.autodeploy


def _head_norm(node, rope: Node):
    """(input, weight, eps, offset, cast_first) of a plain norm used only by ``rope``, else None."""
    if getattr(node, "target", None) != ops.rms_norm.default or len(node.users) != 1:
        return None
    x, weight, gate, eps, group, offset, cast_first, dtype = node.args
    if gate is not None or group or dtype != x.meta["val"].dtype:
        return None
    return x, weight, eps, offset, cast_first


class FuseNormRope(Transform):
    name = "fuse_norm_rope"

    def apply(self, gm: GraphModule, info: TransformInfo) -> None:
        graph = gm.graph
        for rope in [n for n in graph.nodes if n.op == "call_function" and n.target == ops.rope.default]:
            qn, kn, position_ids, cos, sin, token_dim = rope.args
            q, k = _head_norm(qn, rope), _head_norm(kn, rope)
            if q is None or k is None or qn is kn or q[2:] != k[2:]:
                continue
            with graph.inserting_before(rope):
                new = graph.call_function(ops.rms_norm_rope.default,
                                          (q[0], k[0], q[1], k[1], *q[2:], position_ids, cos, sin, token_dim))
            new.meta.update(rope.meta)
            rope.replace_all_uses_with(new)
            for node in (rope, qn, kn):
                graph.erase_node(node)
            info.num_matches += 1
        info.changed = bool(info.num_matches)
