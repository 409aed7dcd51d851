"""Mamba2 routing for dynamo: ``prepare(model)`` routes the model's Mamba2 kernel entry points to
the canonical ops while it runs; ``unprepare`` undoes it."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from typing import Any

import torch

import autodeploy.custom_ops  # noqa: F401  (registers the canonical ops)
from autodeploy.export import MAMBA_ROUTES, hub_kernel_name, route_mamba_entry_points, ssm_mixers

_UNCACHED_ROUTES = {"mamba_chunk_scan_combined", "causal_conv1d_fn", "mamba_split_conv1d_scan_combined"}


def _cached_entry_points(model: torch.nn.Module) -> list[tuple[Any, str, Any]]:
    """The decode-time entry points (``causal_conv1d_update``, ``selective_state_update``) of the
    modeling modules of ``model``'s mixers: kept on their torch path, so generate() still decodes."""
    keep = []
    for name in {type(m).__module__ for m in ssm_mixers(model).values()}:
        module = sys.modules.get(name)
        for attr, value in list(vars(module).items()) if module is not None else ():
            kernel = hub_kernel_name(value)
            if kernel in MAMBA_ROUTES and kernel not in _UNCACHED_ROUTES:
                keep.append((module, attr, value))
    return keep


@contextlib.contextmanager
def _routed(keep: list[tuple[Any, str, Any]]) -> Iterator[None]:
    with route_mamba_entry_points():
        for module, attr, value in keep:
            setattr(module, attr, value)
        yield


def prepare(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model``'s Mamba2 mixers call ``autodeploy::ssd_scan`` / ``causal_conv1d`` (returns it).

    Compile the module (``torch.compile(prepare(model), backend="autodeploy")``, or prepare after
    ``model.forward = torch.compile(model.forward, ...)``), not the prepared ``model.forward``
    itself: dynamo would trace the routing instead of running it. Every call of the model
    (compiled or not) then runs inside ``export.route_mamba_entry_points``, entered outside the
    compiled frame: dynamo captures the canonical ops, its guards on the patched entry points hold
    on every call, and the patches are undone when the call returns. The eager model runs the ops'
    torch references. Decode-time entry points keep their torch path. A model without Mamba2
    mixers is returned unchanged. :func:`unprepare` undoes it.
    """
    if not ssm_mixers(model) or "_autodeploy_original_forward" in vars(model):
        return model
    original = model.forward
    had_own = "forward" in vars(model)  # an instance-level forward (e.g. accelerate's hooks)
    keep = _cached_entry_points(model)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if torch.compiler.is_compiling():
            # only when this very function was handed to torch.compile (torch.compile(model.forward)
            # after prepare), which makes dynamo trace it: the mixers then stay on their torch path
            return original(*args, **kwargs)
        with _routed(keep):
            return original(*args, **kwargs)

    # skip this frame only: dynamo still compiles the model's forward called inside it
    model.forward = torch._dynamo.disable(forward, recursive=False)
    model._autodeploy_original_forward = (original, had_own)
    return model


def unprepare(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`prepare`."""
    if "_autodeploy_original_forward" in vars(model):
        original, had_own = model._autodeploy_original_forward
        del model._autodeploy_original_forward
        if had_own:
            model.forward = original
        else:
            del model.forward
    return model
