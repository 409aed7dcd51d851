"""Graph transforms. ``TRANSFORMS`` is the registry: a plain dict, so grep finds every entry."""

from __future__ import annotations

from autodeploy.transforms.base import Transform, TransformConfig, TransformInfo
from autodeploy.transforms.insert_cached_attention import InsertCachedAttention
from autodeploy.transforms.insert_cached_ssm import InsertCachedSSM
from autodeploy.transforms.insert_index_checks import InsertIndexChecks
from autodeploy.transforms.match_attention import MatchAttention
from autodeploy.transforms.pipeline import DEFAULT_PIPELINE, run_pipeline

TRANSFORMS: dict[str, type[Transform]] = {
    MatchAttention.name: MatchAttention,
    InsertCachedAttention.name: InsertCachedAttention,
    InsertCachedSSM.name: InsertCachedSSM,
    InsertIndexChecks.name: InsertIndexChecks,
}

__all__ = [
    "DEFAULT_PIPELINE",
    "TRANSFORMS",
    "Transform",
    "TransformConfig",
    "TransformInfo",
    "run_pipeline",
]
