"""insert_cached_ssm: canonical Mamba2 scan and conv -> per-slot cached ops + one prepare node.

Before::

    y, _ = autodeploy.ssd_scan(x, dt, A, B, C, D, dt_bias, None, softplus, lo, hi, chunk)
    h = autodeploy.causal_conv1d(xBC, w, b, act)

After::

    cu_seqlens, has_state = autodeploy.prepare_ssm_metadata(input_ids, seq_lens, cached_lens)
    y = autodeploy.torch_cached_ssd_scan(x, dt, A, B, C, D, dt_bias, ssm_state_i, slots,
                                         cu_seqlens, has_state, softplus, lo, hi, chunk)
    h = autodeploy.torch_cached_causal_conv1d(xBC, w, b, act, conv_state_i, slots, cu_seqlens, has_state)

Each lane continues from its slot's state when it has cached tokens, so prefill chunks and decode
tokens of different sequences share one step.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from autodeploy.cache_spec import RAW_INPUTS, CacheSpec
from autodeploy.fx_utils import graph_input, op_kwargs, op_nodes
from autodeploy.transforms.base import Transform, TransformConfig, TransformInfo

SSD_SCAN = torch.ops.autodeploy.ssd_scan.default
CONV = torch.ops.autodeploy.causal_conv1d.default
PREPARE = torch.ops.autodeploy.prepare_ssm_metadata.default
CACHED_SCAN = {"torch": torch.ops.autodeploy.torch_cached_ssd_scan.default}
CACHED_CONV = {"torch": torch.ops.autodeploy.torch_cached_causal_conv1d.default}


@dataclass
class InsertCachedSSMConfig(TransformConfig):
    backend: str = "torch"


class InsertCachedSSM(Transform):
    name = "insert_cached_ssm"
    Config = InsertCachedSSMConfig

    def apply(self, gm: GraphModule, info: TransformInfo) -> None:
        backend = self.config.backend
        if backend not in CACHED_SCAN:
            raise ValueError(f"{self.name}: unknown backend {backend!r}; known: {sorted(CACHED_SCAN)}")
        scans, convs = op_nodes(gm, SSD_SCAN), op_nodes(gm, CONV)
        if not scans and not convs:
            return
        graph = gm.graph
        input_ids = next(n for n in graph.nodes if n.op == "placeholder")
        raw = {name: graph_input(gm, name) for name in RAW_INPUTS}
        specs: list[CacheSpec] = gm.meta.setdefault("autodeploy_caches", [])
        first = min(scans + convs, key=lambda n: list(graph.nodes).index(n))
        with graph.inserting_before(first):
            prep = graph.call_function(PREPARE, (input_ids, raw["seq_lens"], raw["cached_lens"]))
            cu = graph.call_function(operator.getitem, (prep, 0))
            has_state = graph.call_function(operator.getitem, (prep, 1))
        for index, node in enumerate(scans):
            kw = op_kwargs(node)
            if kw["initial_state"] is not None:
                raise ValueError(f"{self.name}: {node.name} already has an initial state; cannot cache it")
            x_val, b_val = kw["x"].meta["val"], kw["B"].meta["val"]
            name = f"ssm_state_{index}"
            specs.append(CacheSpec(name, "state", "ssm", (x_val.shape[2], x_val.shape[3], b_val.shape[3]),
                                   torch.float32))
            state = graph_input(gm, name)
            with graph.inserting_before(node):
                cached = graph.call_function(CACHED_SCAN[backend], (
                    kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw["D"], kw["dt_bias"], state, raw["slots"],
                    cu, has_state, kw["dt_softplus"], kw["dt_min"], kw["dt_max"], kw["chunk_size"]))
            cached.meta["val"] = node.meta["val"][0]
            for user in list(node.users):
                if user.target is not operator.getitem:
                    raise ValueError(f"{self.name}: unexpected user {user.name} of {node.name}")
                if user.args[1] == 0:
                    user.replace_all_uses_with(cached)
                elif user.users:
                    raise ValueError(f"{self.name}: the final SSM state of {node.name} is used in the graph")
                graph.erase_node(user)
            graph.erase_node(node)
            info.num_matches += 1
        for index, node in enumerate(convs):
            kw = op_kwargs(node)
            weight = kw["weight"].meta["val"]
            name = f"conv_state_{index}"
            specs.append(CacheSpec(name, "state", "conv", (weight.shape[0], weight.shape[1] - 1), weight.dtype))
            state = graph_input(gm, name)
            with graph.inserting_before(node):
                cached = graph.call_function(CACHED_CONV[backend], (
                    kw["x"], kw["weight"], kw["bias"], kw["activation"], state, raw["slots"], cu, has_state))
            cached.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(cached)
            graph.erase_node(node)
            info.num_matches += 1
        info.changed = True
        info.details["prepare_nodes"] = 1
