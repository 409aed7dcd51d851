"""What a model must accept and return to be served, and the adapter that calls it that way.

A model is called as ``model(input_ids, position_ids=..., use_cache=False)`` with ``input_ids``
and ``position_ids`` both ``[1, s]`` int64 (positions ``0..s-1`` at export):

* the first parameter of ``forward`` receives ``input_ids`` (whatever its name);
* ``position_ids`` is passed when ``forward`` names it or takes ``**kwargs``; a model that does
  not take positions must not need them (the build-time self-check catches one that computes
  them itself from ``arange(seq_len)``: a cached engine feeds one chunk at a time);
* ``use_cache=False`` is passed only when ``forward`` names it or takes ``**kwargs``;
* any other parameter must have a default.

It must return the logits ``[1, s, vocab]``: a tensor, a tuple or list whose first item is the
logits, or a dict / transformers ``ModelOutput`` with a ``"logits"`` entry. Anything else is an
:class:`~autodeploy.export.ExportError` saying what was found.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

__all__ = ["ForwardCall", "logits_of", "CallingConventionError"]


class CallingConventionError(TypeError):
    """The model's forward cannot be called, or its output read, the way autodeploy serves models."""


class ForwardCall:
    """How to call one model's ``forward``: read once from its signature."""

    def __init__(self, model: nn.Module):
        self.name = type(model).__name__
        try:
            params = list(inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):  # a builtin or C forward: assume the transformers convention
            self.pass_positions = self.pass_use_cache = True
            return
        var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
        named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not positional and not any(p.kind is p.VAR_POSITIONAL for p in params):
            raise CallingConventionError(f"{self.name}.forward takes no positional parameter for input_ids; "
                                         "it must be forward(input_ids, position_ids=None, ...)")
        self.pass_positions = var_kw or "position_ids" in named
        self.pass_use_cache = var_kw or "use_cache" in named
        supplied = {n for n, given in (("position_ids", self.pass_positions), ("use_cache", self.pass_use_cache))
                    if given}
        missing = [p.name for p in params[1:] if p.default is p.empty and p.name not in supplied
                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if missing:
            raise CallingConventionError(
                f"{self.name}.forward requires {missing}, which autodeploy cannot supply: a served model is "
                "called as forward(input_ids, position_ids=..., use_cache=False); give those parameters defaults")

    def __call__(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if self.pass_positions:
            kwargs["position_ids"] = position_ids
        if self.pass_use_cache:
            kwargs["use_cache"] = False
        return logits_of(model(input_ids, **kwargs), self.name)


def logits_of(out: Any, name: str = "the model") -> torch.Tensor:
    """The logits ``[1, s, vocab]`` out of what a forward returned (tensor, tuple/list, dict or
    ModelOutput); CallingConventionError for anything else."""
    found = type(out).__name__
    if isinstance(out, dict):  # ModelOutput is a dict too
        if out.get("logits") is None:
            raise CallingConventionError(f"{name}.forward returned a {found} without 'logits' (keys {list(out)}); "
                                         "return the logits [1, s, vocab], alone or as 'logits'")
        out = out["logits"]
    elif isinstance(out, (tuple, list)):
        if not out:
            raise CallingConventionError(f"{name}.forward returned an empty {found}; return the logits [1, s, vocab]")
        out = out[0]
    elif not isinstance(out, torch.Tensor) and isinstance(getattr(out, "logits", None), torch.Tensor):
        out = out.logits
    if not isinstance(out, torch.Tensor):
        raise CallingConventionError(f"{name}.forward returned {found} holding {type(out).__name__}; it must return "
                                     "the logits [1, s, vocab]: a tensor, a tuple whose first item is the logits, "
                                     "or a dict / ModelOutput with 'logits'")
    if out.dim() != 3:
        raise CallingConventionError(f"{name}.forward returned logits of shape {tuple(out.shape)}; expected "
                                     "[1, s, vocab]: one row per input token, batch dimension kept")
    return out
