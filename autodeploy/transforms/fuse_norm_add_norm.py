"""fuse_norm_add_norm: a norm whose only consumer is the next residual add + norm becomes one op.

Before::

    h = autodeploy.rms_norm(x, w1, None, eps1, 0, off1, cast1, dtype1)        # post-block norm
    (y, s) = autodeploy.fused_add_rms_norm(h, residual, w2, eps2, off2, cast2, dtype2)

After::

    (y, s) = autodeploy.rms_norm_add_rms_norm(x, w1, eps1, off1, cast1, dtype1, residual, w2, eps2, off2, cast2,
                                              dtype2)

Gemma 2/3 normalise each attention and MLP output before adding it to the residual stream, whose
next norm ``match_rms_norm`` already fused with the add: the pair becomes one launch per row on
CUDA (custom_ops/norm_add_norm.py). Plain norms only (no gate, no channel groups); the add may
take the norm on either side. Matches ``match_rms_norm``'s ops, so it runs after it.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

import autodeploy.custom_ops.norm_add_norm  # noqa: F401  (registers the op)
from autodeploy.transforms.base import Transform, TransformInfo

ops = torch.ops.autodeploy


class FuseNormAddNorm(Transform):
    name = "fuse_norm_add_norm"

    def apply(self, gm: GraphModule, info: TransformInfo) -> None:
        graph = gm.graph
        for add in [n for n in graph.nodes if n.op == "call_function" and n.target == ops.fused_add_rms_norm.default]:
            a, b, *norm2 = add.args
            for first, residual in ((a, b), (b, a)):
                if (getattr(first, "target", None) == ops.rms_norm.default and len(first.users) == 1
                        and first is not residual and first.args[2] is None and not first.args[4]):
                    x, w1, _, eps1, _, off1, cast1, dtype1 = first.args
                    with graph.inserting_before(add):
                        new = graph.call_function(ops.rms_norm_add_rms_norm.default,
                                                  (x, w1, eps1, off1, cast1, dtype1, residual, *norm2))
                    new.meta.update(add.meta)
                    add.replace_all_uses_with(new)
                    graph.erase_node(add)
                    graph.erase_node(first)
                    info.num_matches += 1
                    break
        info.changed = bool(info.num_matches)
