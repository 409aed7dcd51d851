"""Graph transforms. ``TRANSFORMS`` is the registry: a plain dict, so grep finds every entry."""

from __future__ import annotations

from autodeploy.transforms.base import Transform, TransformConfig, TransformInfo
from autodeploy.transforms.fold_constants import FoldConstants
from autodeploy.transforms.fuse_mamba_decode import FuseMambaDecode
from autodeploy.transforms.fuse_norm_add_norm import FuseNormAddNorm
from autodeploy.transforms.fuse_norm_linear import FuseNormLinear
from autodeploy.transforms.fuse_norm_rope import FuseNormRope
from autodeploy.transforms.fuse_projections import FuseProjections
from autodeploy.transforms.gather_logits import GatherLogits
from autodeploy.transforms.insert_cached_attention import InsertCachedAttention
from autodeploy.transforms.insert_cached_ssm import InsertCachedSSM
from autodeploy.transforms.insert_index_checks import InsertIndexChecks
from autodeploy.transforms.match_attention import MatchAttention
from autodeploy.transforms.match_gated_activation import MatchGatedActivation
from autodeploy.transforms.match_linear import MatchLinear
from autodeploy.transforms.match_rms_norm import MatchRMSNorm
from autodeploy.transforms.match_rope import MatchRope
from autodeploy.transforms.pipeline import DEFAULT_PIPELINE, run_pipeline
from autodeploy.transforms.shard_tensor_parallel import ShardTensorParallel

TRANSFORMS: dict[str, type[Transform]] = {
    MatchAttention.name: MatchAttention,
    ShardTensorParallel.name: ShardTensorParallel,
    InsertCachedAttention.name: InsertCachedAttention,
    InsertCachedSSM.name: InsertCachedSSM,
    InsertIndexChecks.name: InsertIndexChecks,
    MatchRope.name: MatchRope,
    MatchRMSNorm.name: MatchRMSNorm,
    FuseProjections.name: FuseProjections,
    MatchGatedActivation.name: MatchGatedActivation,
    GatherLogits.name: GatherLogits,
    FoldConstants.name: FoldConstants,
    MatchLinear.name: MatchLinear,
    FuseNormLinear.name: FuseNormLinear,
    FuseNormAddNorm.name: FuseNormAddNorm,
    FuseNormRope.name: FuseNormRope,
    FuseMambaDecode.name: FuseMambaDecode,
}

__all__ = [
    "DEFAULT_PIPELINE",
    "TRANSFORMS",
    "Transform",
    "TransformConfig",
    "TransformInfo",
    "run_pipeline",
]
