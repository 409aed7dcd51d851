"""shard_tensor_parallel: split column/row-parallel linear pairs over the ranks of a TP group.

Before (an attention layer; MLPs and Mamba2 mixers alike)::

    q = linear(h, Wq); k = linear(h, Wk); v = linear(h, Wv)        # Wq [hq*d, hidden]
    o = autodeploy.attention(view(q, [1, s, -1, d]), ...)          # [1, s, hq, d]
    out = linear(reshape(o, [1, s, -1]), Wo)                       # Wo [hidden, hq*d]

After, on rank r of N::

    q = linear(h, Wq[rows of q heads r*hq/N ..]); k = ...; v = ...                 # column-parallel
    o = autodeploy.attention(...)                                                 # [1, s, hq/N, d]
    out = autodeploy.all_reduce(linear(reshape(o, [1, s, -1]), Wo[:, same cols]))  # row-parallel

**Detection is structural.** A *row* linear R and its *column* linears C: every linear whose
output reaches exactly one linear (R) and nothing else, through a region of ops whose only other
inputs are parameters, constants and position-only tensors (never the hidden stream: a residual
add ends a region). Attention q/k/v -> o_proj, MLP gate/up -> down and Mamba2 in_proj -> out_proj
come out this way, fused projections (one qkv or gate_up linear and a split) too.

**Which channels a rank owns** is solved over the region, starting from R's input (rank r owns
the r-th contiguous 1/N of it) and propagating through views (channels <-> whole heads), splits
(in_proj's [z | x B C | dt]), transposes, pointwise ops, reductions, the depthwise conv, and the
canonical ops: attention (query heads; KV heads by GQA group), ssd_scan (SSM heads; B/C groups by
head group). So a rank owns whole attention heads with their KV heads, and whole SSM heads with
their conv channels, dt, A, D, dt_bias, B/C groups and gated-norm groups. Parameters the region
reads (conv weight, A_log, norm weight, sinks) are sliced the same way; hard-coded sizes in
view/reshape/split nodes are rewritten; shapes are re-propagated, so the cache-insertion
transforms that run next see per-rank head counts and size the caches per rank.

**Head counts.** Query heads, SSM heads and the row input must divide by N; otherwise a
:class:`ShardingError` names the module. KV heads (and SSM groups) fewer than N are *replicated*
when N is a multiple of them (each rank keeps the KV head its query heads read, as vLLM does), so
those caches are not split. A region with an op this transform does not know, or whose split
would cut a unit (Mamba2 gated-norm groups fewer than N, a norm over all heads), stays whole on
every rank, with a warning naming the module: replicated compute is always correct.

Embedding and LM head stay replicated (every rank computes full logits, which the sampler needs
on every rank anyway). One all-reduce per row linear; none at all when world_size is 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule

import autodeploy.custom_ops.all_reduce  # noqa: F401  (registers autodeploy::all_reduce)
from autodeploy.graph_record import graph_record
from autodeploy.transforms.base import Transform, TransformConfig, TransformInfo
from autodeploy.transforms.tensor_parallel.regions import (
    ATTENTION,
    ShardingError,
    _shape,
    _Unsupported,
    find_regions,
    logger,
)
from autodeploy.transforms.tensor_parallel.rewrite import (
    _check_heads,
    _insert_all_reduce,
    _ParamSlicer,
    _plan_region,
    _refresh_shapes,
    _rewrite_sizes,
)
from autodeploy.transforms.tensor_parallel.solver import _Solver

__all__ = ["ShardTensorParallel", "ShardTensorParallelConfig", "ShardingError", "find_regions"]


@dataclass
class ShardTensorParallelConfig(TransformConfig):
    rank: int = 0
    world_size: int = 1


class ShardTensorParallel(Transform):
    name = "shard_tensor_parallel"
    Config = ShardTensorParallelConfig
    requires = ("match_attention",)

    def apply(self, gm: GraphModule, info: TransformInfo) -> None:
        rank, ws = self.config.rank, self.config.world_size
        if not isinstance(ws, int) or ws < 1 or not isinstance(rank, int) or not 0 <= rank < ws:
            raise ValueError(f"{self.name}: need 0 <= rank < world_size, got rank={rank!r}, world_size={ws!r}")
        info.details.update(rank=rank, world_size=ws)
        if ws == 1:
            return
        if graph_record(gm).caches:
            raise ValueError(f"{self.name} must run before insert_cached_attention / insert_cached_ssm: "
                             "caches are sized from the sharded head counts")
        slicer = _ParamSlicer(gm)
        sharded, replicated, replicated_kv = [], [], []
        for region in find_regions(gm):
            _check_heads(region, ws)
            try:
                own = _Solver(region, rank, ws).solve()
                plan = _plan_region(region, own, slicer)
            except _Unsupported as e:
                logger.warning("shard_tensor_parallel: %s stays replicated on every rank: %s", region.name, e)
                replicated.append(region.name)
                continue
            if any(n.target == ATTENTION and _shape(n.args[1])[2] < ws for n in region.nodes):
                replicated_kv.append(region.name)
            slicer.commit(plan)
            _rewrite_sizes(region, own)
            _insert_all_reduce(gm, region.row)
            sharded.append(region.name)
            info.num_matches += 1
        info.details.update(all_reduces=len(sharded), sharded=sharded, replicated=replicated,
                            replicated_kv_heads=replicated_kv)
        if sharded:
            _refresh_shapes(gm)
            info.changed = True
