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
import itertools
import os
import weakref
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.fx import GraphModule

from autodeploy.graph_record import GraphRecord, HostHalfSpec, graph_record, update_record


@dataclass(frozen=True)
class CachedOp:
    """One backend's cached op of one family: the module whose import registers it, its name in
    the autodeploy namespace, and its optional host half ("module:Class", see :class:`HostHalf`)."""

    module: str
    op: str
    host_half: str | None = None


# family -> backend -> its cached op. Adding a backend is an entry per family here plus its op file
# (and, where the backend has requirements, a branch in ``unavailable_reason``).
CACHED_OPS: dict[str, dict[str, CachedOp]] = {
    "attention": {
        "torch": CachedOp("autodeploy.custom_ops.torch_cached_attention", "torch_cached_attention"),
        "triton": CachedOp("autodeploy.custom_ops.triton_attention", "triton_cached_attention"),
        "flashinfer": CachedOp("autodeploy.custom_ops.flashinfer_attention", "flashinfer_cached_attention",
                               host_half="autodeploy.custom_ops.flashinfer_attention:AttentionPlan"),
    },
    "ssd_scan": {
        "torch": CachedOp("autodeploy.custom_ops.torch_cached_ssm", "torch_cached_ssd_scan"),
        "triton": CachedOp("autodeploy.custom_ops.triton_ssd_scan", "triton_cached_ssd_scan"),
        # plain decode lanes through flashinfer's selective_state_update, the rest through Triton
        "flashinfer": CachedOp("autodeploy.custom_ops.flashinfer_ssd_scan", "flashinfer_cached_ssd_scan"),
    },
    "causal_conv1d": {
        "torch": CachedOp("autodeploy.custom_ops.torch_cached_ssm", "torch_cached_causal_conv1d"),
        "triton": CachedOp("autodeploy.custom_ops.triton_causal_conv1d", "triton_cached_causal_conv1d"),
        # none in flashinfer: its Triton one
        "flashinfer": CachedOp("autodeploy.custom_ops.triton_causal_conv1d", "triton_cached_causal_conv1d"),
    },
}
# every backend name, in the order the table first names them
BACKENDS: tuple[str, ...] = tuple(dict.fromkeys(b for by_backend in CACHED_OPS.values() for b in by_backend))
# what "auto" tries first, per family, by measurement (benchmarks/RESULTS.md; H200, bf16
# bench-hybrid-0.6b under CUDA graphs with async scheduling): Triton attention decodes 1.4-1.9x
# faster than flashinfer's, whose host plan() costs more per step (0.6-1.4 ms) than the attention
# itself; flashinfer's selective_state_update and the Triton scan give the same decode rate at
# batch 1 and 64 (1,252 vs 1,251 and 40,264 vs 40,078 tok/s), and only the Triton path fuses the
# Mamba2 decode, so Triton comes first for every family
AUTO_ORDER = {family: ("triton", "flashinfer", "torch") for family in ("attention", "ssd_scan", "causal_conv1d")}


FLASHINFER_DTYPES = ("float16", "bfloat16")  # its attention and Mamba kernels are built for these


def unavailable_reason(backend: str, device: str, dtype: str | None = None) -> str | None:
    """Why ``backend`` cannot run on ``device`` for a model in ``dtype`` (a DeployConfig dtype name;
    None: any), or None if it can."""
    on_cuda = str(device).startswith("cuda")
    if not any(backend in by_backend for by_backend in CACHED_OPS.values()):
        return f"unknown backend {backend!r}; known: {list(BACKENDS)} or 'auto'"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            return (f"Triton kernels need a CUDA device (device is {device!r}; TRITON_INTERPRET=1 runs them on the "
                    "CPU, slowly)")
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
    return None  # torch, and a backend without requirements


def resolve(family: str, requested: str, device: str, dtype: str | None = None) -> str:
    """The backend to use for ``family``: ``requested`` if it can run, the best available one for
    ``"auto"``; ValueError naming the reason otherwise."""
    known = CACHED_OPS[family]
    if requested == "auto":  # the interpreter is for tests: on the CPU, auto means torch
        on_cuda = str(device).startswith("cuda")
        return next(b for b in AUTO_ORDER[family] if b in known and unavailable_reason(b, device, dtype) is None
                    and (on_cuda or b == "torch"))
    if requested not in known:
        raise ValueError(f"no {requested!r} backend for {family}; known: {sorted(known)} or 'auto'")
    reason = unavailable_reason(requested, device, dtype)
    if reason:
        raise ValueError(f"{family} backend {requested!r} is unavailable: {reason}")
    return requested


def cached_op(family: str, backend: str) -> torch._ops.OpOverload:
    """The cached op of ``family`` on ``backend`` (importing its module registers it)."""
    try:
        entry = CACHED_OPS[family][backend]
    except KeyError:
        raise ValueError(f"no {backend!r} backend for {family}; known: {sorted(CACHED_OPS[family])}") from None
    importlib.import_module(entry.module)
    return getattr(torch.ops.autodeploy, entry.op).default


class HostHalf(Protocol):
    """Host work a backend's cached op needs before every step (flashinfer's ``plan()``). The op
    takes one argument more than its family's other backends: the id of its host half. A cache
    insertion transform asks ``spec_for`` for each layer (equal specs share one host half, and so
    one id) and records the specs in the graph's record (``record_host_half``); the runner builds
    the host halves from them (``build_host_halves``), which registers each under its id for the
    op to find (``host_half``), and calls ``plan`` on every path: eager steps, warm-up, CUDA-graph
    capture and replay."""

    @classmethod
    def spec_for(cls, layer: Any) -> Hashable:
        """What this host half needs to know about ``layer`` (the family's layer record); ValueError
        naming what it cannot serve."""

    @classmethod
    def build(cls, spec: Any, num_lanes: int, max_pages_per_lane: int, device: Any) -> HostHalf:
        """The host half for ``spec`` of a runner with ``num_lanes`` lanes."""

    def plan(self, host: dict[str, torch.Tensor], captured: bool) -> None: ...


_host_half_ids = itertools.count()
# plan id -> the live host half of that id. Ids are unique in the process (a target and its draft
# model own separate ones), so one table serves every runner; the runner holds its halves and this
# table only refers to them, so a dropped engine frees them (flashinfer's workspaces with them)
_LIVE_HOST_HALVES: weakref.WeakValueDictionary[int, HostHalf] = weakref.WeakValueDictionary()


def host_half_class(family: str, backend: str) -> type[HostHalf] | None:
    """The host half class of ``family``'s op on ``backend``, or None if it has none."""
    path = CACHED_OPS[family][backend].host_half
    if path is None:
        return None
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def record_host_half(gm: GraphModule, family: str, backend: str, spec: Hashable) -> int:
    """The id of the host half for ``spec`` in ``gm``'s record (a new process-wide unique id,
    recorded, for a spec the graph does not have yet)."""
    record = graph_record(gm)
    for half in record.host_halves:
        if (half.family, half.backend, half.spec) == (family, backend, spec):
            return half.plan_id
    plan_id = next(_host_half_ids)
    update_record(gm, host_halves=(*record.host_halves, HostHalfSpec(plan_id, family, backend, spec)))
    return plan_id


def register_host_half(plan_id: int, half: HostHalf) -> HostHalf:
    """Make ``half`` the one the ops of ``plan_id`` run with (while the caller holds it)."""
    if plan_id in _LIVE_HOST_HALVES:
        raise ValueError(f"host half {plan_id} already belongs to another runner: build one runner per cached graph")
    _LIVE_HOST_HALVES[plan_id] = half
    return half


def host_half(plan_id: int) -> HostHalf:
    """The live host half of ``plan_id``: what a cached op that takes a plan id runs with."""
    half = _LIVE_HOST_HALVES.get(plan_id)
    if half is None:
        raise RuntimeError(f"no host half {plan_id} is live: a graph whose ops take a plan id runs inside the "
                           "GraphRunner that built its host halves")
    return half


def build_host_halves(record: GraphRecord, num_lanes: int, max_pages_per_lane: int, device: Any) -> list[HostHalf]:
    """One host half per id in the graph's ``record``, registered for its ops, for a runner of
    ``num_lanes`` lanes; the caller keeps them alive for as long as it runs the graph."""
    return [register_host_half(h.plan_id, host_half_class(h.family, h.backend).build(
                h.spec, num_lanes, max_pages_per_lane, device))
            for h in sorted(record.host_halves, key=lambda h: h.plan_id)]
