"""Programmatic dependent launch (PDL) for the Triton kernels of a decode step.

At batch 1 a decode step is ~90 short kernels, each paying a launch ramp and a drain. Launched
with PDL (Hopper and newer), a kernel may start while the one before it finishes; it waits
(``griddepcontrol.wait``) for that kernel's completion and memory before reading anything, so
results are unchanged, bit for bit. Kernels call ``pdl_wait(PDL)`` first (the one-row GEMVs first
load their weights, which no kernel writes) and their launches take ``**pdl_launch(device)``.
On by default on compute capability 9+ (``AUTODEPLOY_PDL=0`` switches it off); CUDA graphs
capture the launch attribute. On an H200 it gained 7-10 % at batch 1 on the Gemma 3 270M
architecture and was within run-to-run noise on bench-hybrid-0.6b (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

__all__ = ["PDL_ENABLED", "use_pdl", "pdl_launch", "pdl_wait"]

PDL_ENABLED = os.environ.get("AUTODEPLOY_PDL", "1") != "0"


def use_pdl(device: torch.device) -> bool:
    """PDL on ``device``: enabled, a CUDA device of compute capability 9 or newer, not interpreted."""
    return (PDL_ENABLED and device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def pdl_launch(device: torch.device) -> dict:
    """The launch keywords of a kernel taking a ``PDL`` constexpr: the flag and the launch attribute."""
    on = use_pdl(device)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one (no-ops when PDL is off)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
