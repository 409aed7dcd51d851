"""MLP activation as one op: ``autodeploy::gated_activation(gate, up, activation)``.

``act(gate) * up`` for SiLU (Llama's SwiGLU) and GELU (exact or tanh-approximated, Gemma's
GeGLU); ``act(gate)`` alone when ``up`` is None (NemotronH's squared ReLU, two kernels in eager).
With fused gate/up projections both operands are column slices of one GEMM output; the Triton
kernel reads them through their strides, so nothing is copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gated_activation", "gated_activation_reference", "ACTIVATIONS"]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu2")


def _act(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(x)
    if activation in ("gelu", "gelu_tanh"):
        return F.gelu(x, approximate="tanh" if activation == "gelu_tanh" else "none")
    if activation == "relu2":
        return torch.square(torch.relu(x))
    raise ValueError(f"unknown activation {activation!r}; known: {ACTIVATIONS}")


def gated_activation_reference(gate: torch.Tensor, up: torch.Tensor | None, activation: str) -> torch.Tensor:
    return _act(gate, activation) * up if up is not None else _act(gate, activation)


@torch.library.custom_op("autodeploy::gated_activation", mutates_args=())
def gated_activation(gate: torch.Tensor, up: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``act(gate) * up`` (or ``act(gate)``) elementwise; gate and up have the same shape."""
    if gate.is_cuda:
        from autodeploy.custom_ops.triton_gated_activation import triton_gated_activation

        return triton_gated_activation(gate, up, activation)
    return gated_activation_reference(gate, up, activation).contiguous()  # the layout the fake declares


@gated_activation.register_fake
def _(gate, up, activation):
    return torch.empty_like(gate * up if up is not None else gate, memory_format=torch.contiguous_format)
