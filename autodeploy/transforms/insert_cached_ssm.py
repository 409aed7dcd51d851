"""insert_cached_ssm: canonical Mamba2 scan and conv -> per-slot cached ops + one prepare node.

Before::

    y, _ = autodeploy.ssd_scan(x, dt, A, B, C, D, dt_bias, None, softplus, lo, hi, chunk)
    h = autodeploy.causal_conv1d(xBC, w, b, act)

After::

    cu, has_state, replay_lens, is_verify = autodeploy.prepare_ssm_metadata(
        input_ids, seq_lens, cached_lens, accepted_lens, verify)
    y = autodeploy.<backend>_cached_ssd_scan(x, dt, A, B, C, D, dt_bias, ssm_state_i, replay_x_i, replay_dt_i,
                                         replay_B_i, slots, cu, has_state, replay_lens, is_verify,
                                         softplus, lo, hi, chunk)
    h = autodeploy.<backend>_cached_causal_conv1d(xBC, w, b, act, conv_state_i, replay_conv_i, slots, cu,
                                              has_state, replay_lens, is_verify)

Each lane continues from its slot's state when it has cached tokens, so prefill chunks, decodes
and verify steps of different sequences share one step. With ``max_draft_tokens`` K > 0 every
scan and conv also gets per-slot replay buffers for 1 + K tokens (pool "replay"); with K = 0 they
are None and a verify lane is an error.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from autodeploy.backends import cached_op
from autodeploy.cache_spec import POOL_REPLAY, RAW_INPUTS, CacheSpec
from autodeploy.fx_utils import op_kwargs, op_nodes
from autodeploy.graph_record import add_cache, add_input, record_bound
from autodeploy.transforms.base import Transform, TransformConfig, TransformInfo

SSD_SCAN = torch.ops.autodeploy.ssd_scan.default
CONV = torch.ops.autodeploy.causal_conv1d.default
PREPARE = torch.ops.autodeploy.prepare_ssm_metadata.default


@dataclass
class InsertCachedSSMConfig(TransformConfig):
    backend: str = "torch"  # for the scan and the conv; see autodeploy.backends
    max_draft_tokens: int = 0  # K: draft tokens a verify step may carry (0: no speculation)


class InsertCachedSSM(Transform):
    name = "insert_cached_ssm"
    Config = InsertCachedSSMConfig

    def apply(self, gm: GraphModule, info: TransformInfo) -> None:
        backend = self.config.backend
        k = self.config.max_draft_tokens
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"{self.name}: max_draft_tokens must be an int >= 0, got {k!r}")
        scans, convs = op_nodes(gm, SSD_SCAN), op_nodes(gm, CONV)
        if not scans and not convs:
            return
        cached_scan, cached_conv = cached_op("ssd_scan", backend), cached_op("causal_conv1d", backend)
        graph = gm.graph
        input_ids = next(n for n in graph.nodes if n.op == "placeholder")
        raw = {name: add_input(gm, name) for name in RAW_INPUTS}
        record_bound(gm, "max_draft_tokens", k, self.name)  # the replay buffers hold 1 + K tokens

        def cache(name: str, pool: str, shape: tuple[int, ...], dtype: torch.dtype):
            return add_cache(gm, CacheSpec(name, "state", pool, shape, dtype))

        def replay(name: str, shape: tuple[int, ...], dtype: torch.dtype):
            return cache(name, POOL_REPLAY, (k + 1, *shape), dtype) if k else None

        first = min(scans + convs, key=lambda n: list(graph.nodes).index(n))
        with graph.inserting_before(first):
            prep = graph.call_function(PREPARE, (input_ids, raw["seq_lens"], raw["cached_lens"],
                                                 raw["accepted_lens"], raw["verify"]))
            cu, has_state, replay_lens, is_verify = (graph.call_function(operator.getitem, (prep, i))
                                                     for i in range(4))
        lanes = (raw["slots"], cu, has_state, replay_lens, is_verify)
        for index, node in enumerate(scans):
            kw = op_kwargs(node)
            if kw["initial_state"] is not None:
                raise ValueError(f"{self.name}: {node.name} already has an initial state; cannot cache it")
            x_val, dt_val, b_val = (kw[a].meta["val"] for a in ("x", "dt", "B"))
            _, _, h, p = x_val.shape
            g, n = b_val.shape[2:]
            state = cache(f"ssm_state_{index}", "ssm", (h, p, n), torch.float32)
            buffers = (replay(f"replay_x_{index}", (h, p), x_val.dtype),
                       replay(f"replay_dt_{index}", (h,), dt_val.dtype),
                       replay(f"replay_B_{index}", (g, n), b_val.dtype))
            with graph.inserting_before(node):
                cached = graph.call_function(cached_scan, (
                    kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw["D"], kw["dt_bias"], state, *buffers, *lanes,
                    kw["dt_softplus"], kw["dt_min"], kw["dt_max"], kw["chunk_size"]))
            cached.meta["val"] = node.meta["val"][0]
            cached.meta["nn_module_stack"] = node.meta.get("nn_module_stack")
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
            c, width = weight.shape
            state = cache(f"conv_state_{index}", "conv", (c, width - 1), weight.dtype)
            buffer = replay(f"replay_conv_{index}", (c,), weight.dtype)
            with graph.inserting_before(node):
                cached = graph.call_function(cached_conv, (
                    kw["x"], kw["weight"], kw["bias"], kw["activation"], state, buffer, *lanes))
            cached.meta["val"] = node.meta.get("val")
            cached.meta["nn_module_stack"] = node.meta.get("nn_module_stack")
            node.replace_all_uses_with(cached)
            graph.erase_node(node)
            info.num_matches += 1
        info.changed = True
        info.details["prepare_nodes"] = 1
