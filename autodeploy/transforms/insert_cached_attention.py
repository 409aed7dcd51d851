"""insert_cached_attention: canonical attention -> paged cached attention + prepare nodes.

Before::

    out = autodeploy.attention(q, k, v, scale, W, cap, sinks)            # [1, T, h, d]

After (one prepare node per pool, shared by the layers that use it)::

    meta = autodeploy.prepare_attention_metadata(input_ids, seq_lens, cached_lens, slots,
                                                 page_table, page_size, W, ring_pages(W))
    out = autodeploy.<backend>_cached_attention(q, k, v, k_cache_i, v_cache_i, *meta, scale, W, cap, sinks)

Full-attention layers (W = 0) share the paged pool addressed by ``page_table``; sliding-window
layers with window W use a pool of per-slot rings bounded by W and the step's token budget, not by
the sequence length; block-local (chunked) layers with chunk C likewise, rings bounded by C (a
query never sees more than the C - 1 keys before it). Raw inputs and caches become graph inputs,
recorded with the cache specs, the page size and the token budget in the graph's record
(``autodeploy.graph_record``). A backend with a host half (``autodeploy.backends.HostHalf``)
takes one argument more, the id of its host half, whose spec is recorded there too
(``backends.record_host_half``); layers with equal specs share one.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from autodeploy.backends import cached_op, host_half_class, record_host_half
from autodeploy.cache_spec import POOL_FULL, RAW_INPUTS, CacheSpec, chunk_pool, swa_pool
from autodeploy.custom_ops.attention import CachedAttentionLayer
from autodeploy.custom_ops.prepare_metadata import swa_ring_pages
from autodeploy.fx_utils import op_kwargs, op_nodes
from autodeploy.graph_record import add_cache, add_input, graph_record, record_bound
from autodeploy.transforms.base import Transform, TransformConfig, TransformInfo

ATTENTION = torch.ops.autodeploy.attention.default
PREPARE = torch.ops.autodeploy.prepare_attention_metadata.default


@dataclass
class InsertCachedAttentionConfig(TransformConfig):
    page_size: int = 16
    max_num_tokens: int = 256  # token budget per step: bounds the sliding-window rings
    backend: str = "torch"  # see autodeploy.backends


class InsertCachedAttention(Transform):
    name = "insert_cached_attention"
    Config = InsertCachedAttentionConfig
    requires = ("match_attention",)

    def apply(self, gm: GraphModule, info: TransformInfo) -> None:
        cfg = self.config
        cached_attention = cached_op("attention", cfg.backend)
        host_half = host_half_class("attention", cfg.backend)
        if cfg.page_size <= 0 or cfg.max_num_tokens <= 0:
            raise ValueError(f"{self.name}: page_size and max_num_tokens must be positive, got {cfg}")
        nodes = op_nodes(gm, ATTENTION)
        if not nodes:
            return
        graph = gm.graph
        input_ids = next(n for n in graph.nodes if n.op == "placeholder")
        raw = {name: add_input(gm, name) for name in RAW_INPUTS}
        record_bound(gm, "page_size", cfg.page_size, self.name)
        record_bound(gm, "max_num_tokens", cfg.max_num_tokens, self.name)
        specs: list[CacheSpec] = []
        prepared: dict[tuple[int, int], list[torch.fx.Node]] = {}  # by (ring bound, chunk)
        ring_pages_of: dict[tuple[int, int], int] = {}
        exported_len = graph_record(gm).max_seq_len
        full_pages = -(-exported_len // cfg.page_size) if exported_len is not None else None
        for index, node in enumerate(nodes):
            kw = op_kwargs(node)
            op_window, op_chunk = int(kw["sliding_window"]), int(kw["attention_chunk"])
            if op_window > 0 and op_chunk > 0:
                raise ValueError(f"{self.name}: {node.name} has both a sliding window ({op_window}) and attention "
                                 f"chunks ({op_chunk}); no cache pool serves that combination")
            # a ring only where it is smaller than a full-length page list (a window or chunk at
            # least as long as max_seq_len never binds: the layer shares the full pool, same numbers)
            window = op_window or op_chunk  # the ring's bound
            if window > 0 and full_pages is not None and swa_ring_pages(window, cfg.max_num_tokens,
                                                                         cfg.page_size) >= full_pages:
                window = 0
            chunk = op_chunk if window > 0 else 0  # what the prepare node needs to know
            k_val = kw["k"].meta.get("val")
            hkv, head_dim = k_val.shape[2], k_val.shape[3]
            pool = (chunk_pool(window) if chunk else swa_pool(window)) if window > 0 else POOL_FULL
            key = (window, chunk)
            if key not in ring_pages_of:
                ring_pages_of[key] = swa_ring_pages(window, cfg.max_num_tokens, cfg.page_size) if window > 0 else 0
            ring = ring_pages_of[key]
            caches = []
            for which in ("k", "v"):
                name = f"{which}_cache_{index}"
                specs.append(CacheSpec(name, "kv", pool, (hkv, head_dim), k_val.dtype, window, ring))
                caches.append(add_cache(gm, specs[-1]))
            with graph.inserting_before(node):
                if key not in prepared:
                    prep = graph.call_function(PREPARE, (
                        input_ids, *(raw[n] for n in ("seq_lens", "cached_lens", "slots", "page_table")),
                        cfg.page_size, window, ring, *((chunk,) if chunk else ())))
                    prepared[key] = [graph.call_function(operator.getitem, (prep, i)) for i in range(5)]
                meta = prepared[key]
                cached = graph.call_function(
                    cached_attention,
                    (kw["q"], kw["k"], kw["v"], *caches, *meta, kw["scale"], op_window, kw["soft_cap"], kw["sinks"],
                     *((op_chunk,) if op_chunk else ())),
                )
            if host_half is not None:  # one argument more: the id of the host half that plans the step
                layer = CachedAttentionLayer(
                    node.name, cfg.page_size, window, ring_pages_of[(window, chunk)], op_window, op_chunk,
                    float(kw["scale"]), float(kw["soft_cap"]), kw["sinks"] is not None,
                    kw["q"].meta["val"].shape[2], hkv, head_dim, k_val.dtype)
                try:
                    spec = host_half.spec_for(layer)
                except ValueError as e:
                    raise ValueError(f"{self.name}: {e}") from None
                cached.args = (*cached.args, record_host_half(gm, "attention", cfg.backend, spec))
            cached.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack")})
            node.replace_all_uses_with(cached)
            graph.erase_node(node)
            info.num_matches += 1
        info.changed = True
        info.details["prepare_nodes"] = len(prepared)
        info.details["pools"] = sorted({s.pool for s in specs if s.kind == "kv"})
