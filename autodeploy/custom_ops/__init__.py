"""Custom ops in the ``autodeploy`` namespace: canonical (uncached) ops the transforms match.

Importing this package registers every op with ``torch.library``.
"""

from autodeploy.custom_ops.attention import attention, attention_reference
from autodeploy.custom_ops.causal_conv1d import causal_conv1d, causal_conv1d_reference
from autodeploy.custom_ops.ssd_scan import ssd_scan, ssd_scan_reference

__all__ = [
    "attention",
    "attention_reference",
    "causal_conv1d",
    "causal_conv1d_reference",
    "ssd_scan",
    "ssd_scan_reference",
]
