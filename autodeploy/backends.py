"""Which cached op implements each op family on each backend, and which backend to use.

Backends are chosen per op family (``attention``, ``ssd_scan``, ``causal_conv1d``). ``"auto"``
picks the fastest one, as measured, that can run on the device and dtype: on a GPU, Triton
for both families (flashinfer's attention is slower per decode step once its host ``plan()`` is
counted; its SSM decode kernel measured even with the Triton scan), then flashinfer, then torch;
torch on the CPU
(the torch backend is the oracle and runs everywhere; Triton runs on the CPU only when asked for,
under ``TRITON_INTERPRET=1``, for tests). A backend module is imported only when chosen, so a CPU
user never imports Triton. Requesting a backend that cannot run is an error that says why.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

# family -> backend -> (module that registers the op, op name in the autodeploy namespace)
CACHED_OPS: dict[str, dict[str, tuple[str, str]]] = {
    "attention": {
        "torch": ("autodeploy.custom_ops.torch_cached_attention", "torch_cached_attention"),
        "triton": ("autodeploy.custom_ops.triton_attention", "triton_cached_attention"),
        "flashinfer": ("autodeploy.custom_ops.flashinfer_attention", "flashinfer_cached_attention"),
    },
    "ssd_scan": {
        "torch": ("autodeploy.custom_ops.torch_cached_ssm", "torch_cached_ssd_scan"),
        "triton": ("autodeploy.custom_ops.triton_ssd_scan", "triton_cached_ssd_scan"),
        # plain decode lanes through flashinfer's selective_state_update, the rest through Triton
        "flashinfer": ("autodeploy.custom_ops.flashinfer_ssd_scan", "flashinfer_cached_ssd_scan"),
    },
    "causal_conv1d": {
        "torch": ("autodeploy.custom_ops.torch_cached_ssm", "torch_cached_causal_conv1d"),
        "triton": ("autodeploy.custom_ops.triton_causal_conv1d", "triton_cached_causal_conv1d"),
        "flashinfer": ("autodeploy.custom_ops.triton_causal_conv1d", "triton_cached_causal_conv1d"),  # none in flashinfer
    },
}
PREFERENCE = ("flashinfer", "triton", "torch")
# what "auto" tries first, per family, by measurement (benchmarks/RESULTS.md; H200, bf16
# bench-hybrid-0.6b under CUDA graphs with async scheduling): Triton attention decodes 1.4-1.9x
# faster than flashinfer's, whose host plan() costs more per step (0.6-1.4 ms) than the attention
# itself; flashinfer's selective_state_update and the Triton scan give the same decode rate at
# batch 1 and 64 (1,252 vs 1,251 and 40,264 vs 40,078 tok/s), and only the Triton path fuses the
# Mamba2 decode, so Triton comes first for every family
AUTO_ORDER = {family: ("triton", "flashinfer", "torch") for family in ("attention", "ssd_scan", "causal_conv1d")}
# (family, backend) pairs "auto" does not pick yet: written and CPU-tested, not yet run on a GPU
NOT_YET_AUTO: set[tuple[str, str]] = set()


FLASHINFER_DTYPES = ("float16", "bfloat16")  # its attention and Mamba kernels are built for these


def unavailable_reason(backend: str, device: str, dtype: str | None = None) -> str | None:
    """Why ``backend`` cannot run on ``device`` for a model in ``dtype`` (a DeployConfig dtype name;
    None: any), or None if it can."""
    on_cuda = str(device).startswith("cuda")
    if backend == "torch":
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            return f"Triton kernels need a CUDA device (device is {device!r}; TRITON_INTERPRET=1 runs them on the CPU, slowly)"
        if on_cuda and not torch.cuda.is_available():
            return "no CUDA device is visible"
        return None
    if backend == "flashinfer":
        if importlib.util.find_spec("flashinfer") is None:
            return "flashinfer is not installed (pip install flashinfer-python)"
        if not on_cuda:
            return f"flashinfer needs a CUDA device (device is {device!r})"
        if dtype is not None and dtype not in FLASHINFER_DTYPES:
            return f"flashinfer's kernels take {' or '.join(FLASHINFER_DTYPES)} (dtype is {dtype!r})"
        return None
    return f"unknown backend {backend!r}; known: {list(PREFERENCE)} or 'auto'"


def resolve(family: str, requested: str, device: str, dtype: str | None = None) -> str:
    """The backend to use for ``family``: ``requested`` if it can run, the best available one for
    ``"auto"``; ValueError naming the reason otherwise."""
    known = CACHED_OPS[family]
    if requested == "auto":  # the interpreter is for tests: on the CPU, auto means torch
        on_cuda = str(device).startswith("cuda")
        return next(b for b in AUTO_ORDER[family] if b in known and unavailable_reason(b, device, dtype) is None
                    and (on_cuda or b == "torch") and (family, b) not in NOT_YET_AUTO)
    if requested not in known:
        raise ValueError(f"no {requested!r} backend for {family}; known: {sorted(known)} or 'auto'")
    reason = unavailable_reason(requested, device, dtype)
    if reason:
        raise ValueError(f"{family} backend {requested!r} is unavailable: {reason}")
    return requested


def cached_op(family: str, backend: str) -> torch._ops.OpOverload:
    """The cached op of ``family`` on ``backend`` (importing its module registers it)."""
    try:
        module, name = CACHED_OPS[family][backend]
    except KeyError:
        raise ValueError(f"no {backend!r} backend for {family}; known: {sorted(CACHED_OPS[family])}") from None
    importlib.import_module(module)
    return getattr(torch.ops.autodeploy, name).default
