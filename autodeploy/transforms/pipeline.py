"""Assemble the cached graph: export, the ordered transform list with its options, and running it.

The order is explicit (``DEFAULT_PIPELINE``, overridable by the caller); each transform may name
the transforms it ``requires`` earlier, and the pipeline checks that with a networkx dependency
graph before anything runs, so a misordered list fails fast instead of half-transforming a graph.
``build_cached_graph`` is the whole assembly an engine runs: the backends resolved for the device,
the export, the cached pipeline (``cached_pipeline_plan``: which transforms, with which options)
and the backends recorded on the graph.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch.nn as nn
from torch.fx import GraphModule

from autodeploy import backends
from autodeploy.graph_record import record_backends
from autodeploy.transforms.base import TransformInfo

if TYPE_CHECKING:
    from autodeploy.api import DeployConfig

logger = logging.getLogger("autodeploy.transforms")

DEFAULT_PIPELINE: tuple[str, ...] = ("match_attention",)
# the graph rewrites a serving engine wants (each switchable in DeployConfig.perf_transforms), and
# where they go: the pattern matchers before the caches, the rewrites of the cached graph after
PERF_TRANSFORMS: tuple[str, ...] = ("match_rope", "match_rms_norm", "fuse_norm_add_norm", "fuse_norm_rope",
                                    "fuse_projections", "match_gated_activation", "fold_constants", "fuse_mamba_decode",
                                    "gather_logits", "match_linear", "fuse_norm_linear")
# rewrites of the cached graph, in this order: match_linear after the others that look for aten.linear,
# fuse_norm_linear after match_linear (it fuses into its op)
_AFTER_CACHES = ("fuse_mamba_decode", "gather_logits", "match_linear", "fuse_norm_linear")


# rewrites off by default on a CUDA device: the fused Mamba2 decode mixer runs one launch per layer
# but is slower there than the kernels it replaces (H200, bench-hybrid-0.6b, CUDA graphs: 1,603 vs
# 1,637 tok/s at batch 1, 21,105 vs 41,905 at batch 64); perf_transforms={name: True} switches it on
OFF_BY_DEFAULT_ON_CUDA: frozenset[str] = frozenset({"fuse_mamba_decode"})


def cached_pipeline(perf: dict[str, bool] | None = None, checked: bool = False, device: str = "cpu") -> tuple[str, ...]:
    """The cached pipeline with the performance transforms switched on in ``perf`` (default: all,
    but ``OFF_BY_DEFAULT_ON_CUDA`` on a CUDA device)."""
    perf = dict(perf or {})
    if str(device).startswith("cuda"):
        for name in OFF_BY_DEFAULT_ON_CUDA:
            perf.setdefault(name, False)
    on = [name for name in PERF_TRANSFORMS if perf.get(name, True)]
    before = tuple(n for n in on if n not in _AFTER_CACHES)
    after = tuple(n for n in _AFTER_CACHES if n in on)
    return ("match_attention", *before, "insert_cached_attention", "insert_cached_ssm", *after,
            *(("insert_index_checks",) if checked else ()))


def check_order(names: Sequence[str]) -> None:
    """Raise if a name is unknown or a transform runs before one it requires."""
    from autodeploy.transforms import TRANSFORMS

    unknown = [n for n in names if n not in TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown transform(s) {unknown}; known transforms: {sorted(TRANSFORMS)}")
    deps = nx.DiGraph()
    deps.add_nodes_from(names)
    for name in names:
        for req in TRANSFORMS[name].requires:
            deps.add_edge(req, name)
    position = {n: i for i, n in enumerate(names)}
    for req, name in deps.edges:
        if req not in position:
            raise ValueError(f"transform {name!r} requires {req!r}, which is not in the pipeline {list(names)}")
        if position[req] > position[name]:
            raise ValueError(f"transform {name!r} requires {req!r} to run before it; got order {list(names)}")


def run_pipeline(
    gm: GraphModule,
    names: Sequence[str] | None = None,
    config: Mapping[str, Mapping[str, Any]] | None = None,
    dump_dir: str | Path | None = None,
) -> list[TransformInfo]:
    """Run transforms ``names`` (default ``DEFAULT_PIPELINE``) on ``gm`` in place.

    ``config`` maps a transform name to its options. ``dump_dir`` receives the graph after each
    transform as ``NN_<name>.txt``.
    """
    from autodeploy.transforms import TRANSFORMS

    names = list(DEFAULT_PIPELINE if names is None else names)
    config = dict(config or {})
    check_order(names)
    stray = sorted(set(config) - set(names))
    if stray:
        raise ValueError(f"config given for transform(s) {stray} that are not in the pipeline {names}")
    infos = []
    for index, name in enumerate(names):
        transform = TRANSFORMS[name](config.get(name))
        infos.append(transform(gm, dump_dir=dump_dir, index=index))
    return infos


def resolve_backends(cfg: DeployConfig) -> dict[str, str]:
    """The attention and SSM backends to use (``"auto"`` resolved for the device)."""
    attn = backends.resolve("attention", cfg.attn_backend, cfg.device, cfg.dtype)
    ssm = backends.resolve("ssd_scan", cfg.ssm_backend, cfg.device, cfg.dtype)
    if backends.resolve("causal_conv1d", ssm, cfg.device, cfg.dtype) != ssm:
        raise ValueError(f"no {ssm!r} backend for causal_conv1d")
    return {"attention": attn, "ssm": ssm}


def cached_pipeline_plan(cfg: DeployConfig, chosen: Mapping[str, str], rank: int = 0,
                         ) -> tuple[tuple[str, ...], dict[str, dict[str, Any]]]:
    """(transform names, their options) of the cached pipeline for a completed ``cfg`` with the
    backends ``chosen`` (``resolve_backends``); ``rank``: this process's tensor-parallel rank."""
    names = cached_pipeline(cfg.perf_transforms, cfg.checked, cfg.device)
    if cfg.tensor_parallel_size > 1:  # on the plain exported graph, before fusions and caches
        names = (*names[:1], "shard_tensor_parallel", *names[1:])
    options = {
        "match_attention": {"unmatched": "error"},  # a layer left as exported would see one step's tokens
        "insert_cached_attention": {"page_size": cfg.page_size, "max_num_tokens": cfg.max_num_tokens,
                                    "backend": chosen["attention"]},
        "insert_cached_ssm": {"backend": chosen["ssm"], "max_draft_tokens": cfg.num_speculative_tokens},
        "match_rope": {"max_positions": max(cfg.max_seq_len, cfg.max_num_tokens)},
        "gather_logits": {"max_draft_tokens": cfg.num_speculative_tokens},
        "shard_tensor_parallel": {"rank": rank, "world_size": cfg.tensor_parallel_size},
    }
    return names, {k: v for k, v in options.items() if k in names}


def build_cached_graph(model: nn.Module, cfg: DeployConfig, rank: int = 0) -> tuple[GraphModule, list[TransformInfo]]:
    """Export ``model`` and run the cached pipeline for a completed ``cfg``: (graph, transform infos).
    The graph's record (``autodeploy.graph_record``) holds what the runtime needs, the backends
    chosen included."""
    from autodeploy.export import export_model

    chosen = resolve_backends(cfg)
    gm = export_model(model, max_seq_len=cfg.max_seq_len)
    names, options = cached_pipeline_plan(cfg, chosen, rank)
    infos = run_pipeline(gm, names, options)
    record_backends(gm, chosen)
    return gm, infos
