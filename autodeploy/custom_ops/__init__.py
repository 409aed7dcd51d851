"""Custom ops in the ``autodeploy`` namespace: canonical (uncached) ops the transforms match,
prepare ops that derive kernel metadata in the graph, and cached ops per backend.

Importing this package registers every op with ``torch.library``.
"""

from autodeploy.custom_ops.attention import attention, attention_reference
from autodeploy.custom_ops.causal_conv1d import causal_conv1d, causal_conv1d_reference
from autodeploy.custom_ops.checks import check_attention_metadata, check_ssm_metadata
from autodeploy.custom_ops.gated_activation import gated_activation
from autodeploy.custom_ops.prepare_metadata import prepare_attention_metadata, prepare_logit_rows, prepare_ssm_metadata
from autodeploy.custom_ops.rms_norm import fused_add_rms_norm, rms_norm
from autodeploy.custom_ops.rope import rope
from autodeploy.custom_ops.ssd_scan import ssd_scan, ssd_scan_reference
from autodeploy.custom_ops.torch_cached_attention import torch_cached_attention
from autodeploy.custom_ops.torch_cached_ssm import torch_cached_causal_conv1d, torch_cached_ssd_scan

__all__ = [
    "check_attention_metadata",
    "check_ssm_metadata",
    "attention",
    "fused_add_rms_norm",
    "gated_activation",
    "prepare_logit_rows",
    "rms_norm",
    "rope",
    "attention_reference",
    "causal_conv1d",
    "causal_conv1d_reference",
    "ssd_scan",
    "ssd_scan_reference",
    "prepare_attention_metadata",
    "prepare_ssm_metadata",
    "torch_cached_attention",
    "torch_cached_causal_conv1d",
    "torch_cached_ssd_scan",
]
