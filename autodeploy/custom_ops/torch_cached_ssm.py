"""Cached Mamba2 ops, torch backend (the oracle): per-slot SSM state and conv state.

``torch_cached_ssd_scan`` and ``torch_cached_causal_conv1d`` run each lane's tokens from its
slot's state (or from zeros for a new sequence, ``has_state`` False) and write the state after the
lane's last token back to the slot. Prefill chunks and decode tokens mix freely in one step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autodeploy.custom_ops.causal_conv1d import apply_activation
from autodeploy.custom_ops.ssd_scan import ssd_scan_reference

__all__ = ["torch_cached_ssd_scan", "torch_cached_causal_conv1d"]


def _lanes(cu_seqlens: torch.Tensor, slots: torch.Tensor, has_state: torch.Tensor):
    cu = cu_seqlens.tolist()
    for lane, (slot, continues) in enumerate(zip(slots.tolist(), has_state.tolist())):
        if cu[lane + 1] > cu[lane]:
            yield cu[lane], cu[lane + 1], slot, continues


@torch.library.custom_op("autodeploy::torch_cached_ssd_scan", mutates_args=("ssm_state",))
def torch_cached_ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    ssm_state: torch.Tensor,
    slots: torch.Tensor,
    cu_seqlens: torch.Tensor,
    has_state: torch.Tensor,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    chunk_size: int,
) -> torch.Tensor:
    """x: [1, T, h, p]; dt: [1, T, h]; B, C: [1, T, g, n]; ssm_state: [slots, h, p, n] float32.

    Returns y [1, T, h, p] in x's dtype.
    """
    y = torch.empty_like(x)
    for start, end, slot, continues in _lanes(cu_seqlens, slots, has_state):
        init = ssm_state[slot:slot + 1] if continues else None
        y_lane, state = ssd_scan_reference(
            x[:, start:end], dt[:, start:end], A, B[:, start:end], C[:, start:end], D, dt_bias, init,
            dt_softplus, dt_min, dt_max, chunk_size,
        )
        y[:, start:end] = y_lane
        ssm_state[slot] = state[0].to(ssm_state.dtype)
    return y


@torch_cached_ssd_scan.register_fake
def _(x, dt, A, B, C, D, dt_bias, ssm_state, slots, cu_seqlens, has_state, dt_softplus, dt_min, dt_max,
      chunk_size):
    return torch.empty_like(x)


@torch.library.custom_op("autodeploy::torch_cached_causal_conv1d", mutates_args=("conv_state",))
def torch_cached_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    conv_state: torch.Tensor,
    slots: torch.Tensor,
    cu_seqlens: torch.Tensor,
    has_state: torch.Tensor,
) -> torch.Tensor:
    """x: [1, c, T]; weight: [c, k]; conv_state: [slots, c, k-1] (the last k-1 inputs).

    Returns [1, c, T] in x's dtype.
    """
    c, k = weight.shape
    out = torch.empty_like(x)
    for start, end, slot, continues in _lanes(cu_seqlens, slots, has_state):
        prev = conv_state[slot] if continues else conv_state.new_zeros(c, k - 1)
        window = torch.cat([prev.to(weight.dtype), x[0, :, start:end].to(weight.dtype)], dim=-1)
        y = F.conv1d(window[None], weight.unsqueeze(1), bias, groups=c)
        out[:, :, start:end] = apply_activation(y, activation).to(x.dtype)
        conv_state[slot] = window[:, -(k - 1):].to(conv_state.dtype)
    return out


@torch_cached_causal_conv1d.register_fake
def _(x, weight, bias, activation, conv_state, slots, cu_seqlens, has_state):
    return torch.empty_like(x)
