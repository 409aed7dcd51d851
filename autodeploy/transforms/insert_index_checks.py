"""insert_index_checks: checked mode. Every cached op reads its indices through a range check
(and every ``autodeploy::rope`` its positions, which index the rope tables: ``check_positions``).

Before::

    meta = prepare_attention_metadata(...)
    out = <backend>_cached_attention(..., k_cache, ..., meta)
    cu, has_state, replay, verify = prepare_ssm_metadata(...)
    y = <backend>_cached_ssd_scan(..., slots, cu, ..., replay, verify)

After::

    write, pages, start, len = check_attention_metadata(write, pages, start, len, k_cache, "kv_full")
    out = <backend>_cached_attention(..., write, start, len, pages, ...)
    slots, replay = check_ssm_metadata(slots, cu, has_state, replay, verify, ssm_state, R)
    y = <backend>_cached_ssd_scan(..., slots, cu, has_state, replay, verify, ...)

One check per pool (attention) and one for all SSM/conv ops; checks assert on the device, so
checked mode costs a few tiny kernels per step and no host sync. Requires the cache insertion
transforms.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from autodeploy.cache_spec import POOL_REPLAY
from autodeploy.fx_utils import op_kwargs
from autodeploy.graph_record import graph_record
from autodeploy.transforms.base import Transform, TransformConfig, TransformInfo

CHECK_ATTENTION = torch.ops.autodeploy.check_attention_metadata.default
CHECK_SSM = torch.ops.autodeploy.check_ssm_metadata.default
CHECK_POSITIONS = torch.ops.autodeploy.check_positions.default
ROPE = torch.ops.autodeploy.rope.default


def _kind(node: Node) -> str | None:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    name = node.target._schema.name
    if not name.startswith("autodeploy::"):
        return None
    for kind in ("cached_attention", "cached_ssd_scan", "cached_causal_conv1d", "cached_mamba_mixer"):
        if name.endswith(kind):
            return kind
    return None


def _rewire(node: Node, replacements: dict[str, Node]) -> None:
    names = [a.name for a in node.target._schema.arguments]
    args = list(node.args)
    for name, new in replacements.items():
        i = names.index(name)
        if i < len(args):
            args[i] = new
        else:
            node.update_kwarg(name, new)
    node.args = tuple(args)


class InsertIndexChecks(Transform):
    name = "insert_index_checks"
    Config = TransformConfig
    requires = ("insert_cached_attention", "insert_cached_ssm")

    def apply(self, gm: GraphModule, info: TransformInfo) -> None:
        graph = gm.graph
        specs = graph_record(gm).caches
        replay_capacity = max((s.shape[0] for s in specs if s.pool == POOL_REPLAY), default=0)
        checked: dict[tuple, list[Node]] = {}
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target == ROPE:  # positions index the rope tables
                key = ("rope", node.args[2], getattr(node.args[3], "target", node.args[3]))  # the table
                if key not in checked:
                    with graph.inserting_before(node):
                        checked[key] = [graph.call_function(CHECK_POSITIONS, (node.args[2], node.args[3]))]
                    info.num_matches += 1
                node.args = (*node.args[:2], checked[key][0], *node.args[3:])
                continue
            kind = _kind(node)
            if kind is None:
                continue
            kw = op_kwargs(node)
            if kind == "cached_attention":
                key = ("attention", kw["write_idx"], kw["page_list"], kw["kv_start"], kw["kv_len"])
                if key not in checked:
                    pool = next((s.pool for s in specs if s.name == kw["k_cache"].target), "kv")
                    with graph.inserting_before(node):
                        check = graph.call_function(CHECK_ATTENTION, (
                            kw["write_idx"], kw["page_list"], kw["kv_start"], kw["kv_len"], kw["k_cache"], pool))
                        checked[key] = [graph.call_function(operator.getitem, (check, i)) for i in range(4)]
                    info.num_matches += 1
                write, pages, start, length = checked[key]
                _rewire(node, {"write_idx": write, "page_list": pages, "kv_start": start, "kv_len": length})
            else:
                state = kw["conv_state"] if kind == "cached_causal_conv1d" else kw["ssm_state"]
                key = ("ssm", kw["slots"], kw["replay_lens"])
                if key not in checked:
                    with graph.inserting_before(node):
                        check = graph.call_function(CHECK_SSM, (
                            kw["slots"], kw["cu_seqlens"], kw["has_state"], kw["replay_lens"], kw["is_verify"], state,
                            replay_capacity))
                        checked[key] = [graph.call_function(operator.getitem, (check, i)) for i in range(2)]
                    info.num_matches += 1
                slots, replay = checked[key]
                _rewire(node, {"slots": slots, "replay_lens": replay})
        info.changed = bool(checked)
