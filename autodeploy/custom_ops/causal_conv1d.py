"""Canonical causal depthwise conv1d op: ``autodeploy::causal_conv1d``.

The short convolution in front of a Mamba2 SSM: each channel is convolved with its own kernel
of width k over the current and previous k-1 steps (left zero padding), then an optional
activation. Layout [batch, channels, seq], as transformers' ``causal_conv1d_fn`` takes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d", "causal_conv1d_reference", "ACTIVATIONS"]

ACTIVATIONS = {"": None, "silu": F.silu, "swish": F.silu}


def apply_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported conv activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    fn = ACTIVATIONS[activation]
    return x if fn is None else fn(x)


def causal_conv1d_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str = ""
) -> torch.Tensor:
    """x: [b, c, s]; weight: [c, k]; bias: [c]. Returns [b, c, s] in x's dtype.

    Computed in weight's dtype like transformers' torch path.
    """
    c, k = weight.shape
    s = x.shape[-1]
    out = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=k - 1, groups=c)[..., :s]
    return apply_activation(out, activation).to(x.dtype)


@torch.library.custom_op("autodeploy::causal_conv1d", mutates_args=())
def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> torch.Tensor:
    """Causal depthwise conv1d; see :func:`causal_conv1d_reference`."""
    return causal_conv1d_reference(x, weight, bias, activation)


@causal_conv1d.register_fake
def _causal_conv1d_fake(x, weight, bias, activation):
    return x.new_empty(x.shape)
