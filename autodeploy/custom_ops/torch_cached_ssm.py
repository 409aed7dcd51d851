"""Cached Mamba2 ops, torch backend (the oracle): per-slot SSM and conv state, with replay.

Each lane runs from its slot's state (zeros for a new sequence, ``has_state`` False). Two lane
kinds mix freely in one step with prefill chunks and decodes:

- a committing lane advances the state by its tokens and writes it back;
- a verify lane (speculative decoding, ``is_verify``) computes outputs for its tokens from the
  state but does not advance it: it stores the tokens' inputs in the slot's replay buffer instead.

Before either, a lane first replays ``replay_lens`` tokens from its slot's replay buffer (the
tokens of its previous verify step that were accepted) onto the state and writes that back, so
the state cache always holds the last committed state. Replay buffers hold inputs, not states:
(1 + K) x (x, dt, B) per slot for the scan and (1 + K) conv input columns, far less than 1 + K
copies of the state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autodeploy.custom_ops.causal_conv1d import apply_activation
from autodeploy.custom_ops.ssd_scan import ssd_scan_reference

__all__ = ["torch_cached_ssd_scan", "torch_cached_causal_conv1d"]


def _lanes(cu_seqlens, slots, has_state, replay_lens, is_verify, capacity: int):
    """(start, end, slot, continues, replay, verify) of every lane with work, checked against the
    replay buffer's capacity (``capacity`` tokens per slot; 0 = no buffer)."""
    cu = cu_seqlens.tolist()
    for lane, (slot, continues, replay, verify) in enumerate(
            zip(slots.tolist(), has_state.tolist(), replay_lens.tolist(), is_verify.tolist())):
        n = cu[lane + 1] - cu[lane]
        if n == 0 and replay == 0:
            continue
        if replay > capacity or (verify and n > capacity):
            raise ValueError(f"lane {lane}: replays {replay} / verifies {n if verify else 0} tokens but the "
                             f"replay buffer holds {capacity} per slot (speculation off or K too large)")
        if replay and not continues:
            raise ValueError(f"lane {lane}: replay of {replay} tokens onto a sequence with no cached state")
        yield cu[lane], cu[lane + 1], slot, continues, replay, verify


@torch.library.custom_op("autodeploy::torch_cached_ssd_scan",
                         mutates_args=("ssm_state", "replay_x", "replay_dt", "replay_B"))
def torch_cached_ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    ssm_state: torch.Tensor,
    replay_x: torch.Tensor | None,
    replay_dt: torch.Tensor | None,
    replay_B: torch.Tensor | None,
    slots: torch.Tensor,
    cu_seqlens: torch.Tensor,
    has_state: torch.Tensor,
    replay_lens: torch.Tensor,
    is_verify: torch.Tensor,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    chunk_size: int,
) -> torch.Tensor:
    """x: [1, T, h, p]; dt: [1, T, h]; B, C: [1, T, g, n]; ssm_state: [slots, h, p, n] float32;
    replay_x/dt/B: [slots, R, h, p] / [slots, R, h] / [slots, R, g, n] (None without speculation).

    Returns y [1, T, h, p] in x's dtype.
    """
    capacity = 0 if replay_x is None else replay_x.shape[1]
    y = torch.empty_like(x)
    scan = dict(A=A, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_min=dt_min, dt_max=dt_max,
                chunk_size=chunk_size)
    for start, end, slot, continues, replay, verify in _lanes(cu_seqlens, slots, has_state, replay_lens, is_verify,
                                                               capacity):
        init = ssm_state[slot:slot + 1] if continues else None
        if replay:
            rB = replay_B[slot:slot + 1, :replay]
            _, init = ssd_scan_reference(x=replay_x[slot:slot + 1, :replay], dt=replay_dt[slot:slot + 1, :replay],
                                         B=rB, C=rB, initial_state=init, **scan)
            ssm_state[slot] = init[0].to(ssm_state.dtype)
        if end == start:
            continue
        y_lane, state = ssd_scan_reference(x=x[:, start:end], dt=dt[:, start:end], B=B[:, start:end],
                                           C=C[:, start:end], initial_state=init, **scan)
        y[:, start:end] = y_lane
        if verify:
            replay_x[slot, :end - start] = x[0, start:end].to(replay_x.dtype)
            replay_dt[slot, :end - start] = dt[0, start:end].to(replay_dt.dtype)
            replay_B[slot, :end - start] = B[0, start:end].to(replay_B.dtype)
        else:
            ssm_state[slot] = state[0].to(ssm_state.dtype)
    return y


@torch_cached_ssd_scan.register_fake
def _(x, dt, A, B, C, D, dt_bias, ssm_state, replay_x, replay_dt, replay_B, slots, cu_seqlens, has_state,
      replay_lens, is_verify, dt_softplus, dt_min, dt_max, chunk_size):
    return torch.empty_like(x)


@torch.library.custom_op("autodeploy::torch_cached_causal_conv1d", mutates_args=("conv_state", "replay_conv"))
def torch_cached_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    conv_state: torch.Tensor,
    replay_conv: torch.Tensor | None,
    slots: torch.Tensor,
    cu_seqlens: torch.Tensor,
    has_state: torch.Tensor,
    replay_lens: torch.Tensor,
    is_verify: torch.Tensor,
) -> torch.Tensor:
    """x: [1, c, T]; weight: [c, k]; conv_state: [slots, c, k-1] (the last k-1 inputs);
    replay_conv: [slots, R, c] input columns of the last verify step (None without speculation).

    Returns [1, c, T] in x's dtype.
    """
    c, k = weight.shape
    capacity = 0 if replay_conv is None else replay_conv.shape[1]
    out = torch.empty_like(x)
    for start, end, slot, continues, replay, verify in _lanes(cu_seqlens, slots, has_state, replay_lens, is_verify,
                                                               capacity):
        prev = conv_state[slot] if continues else conv_state.new_zeros(c, k - 1)
        if replay:
            prev = torch.cat([prev, replay_conv[slot, :replay].T.to(prev.dtype)], dim=-1)[:, -(k - 1):]
            conv_state[slot] = prev
        if end == start:
            continue
        window = torch.cat([prev.to(weight.dtype), x[0, :, start:end].to(weight.dtype)], dim=-1)
        y = F.conv1d(window[None], weight.unsqueeze(1), bias, groups=c)
        out[:, :, start:end] = apply_activation(y, activation).to(x.dtype)
        if verify:
            replay_conv[slot, :end - start] = x[0, :, start:end].T.to(replay_conv.dtype)
        else:
            conv_state[slot] = window[:, -(k - 1):].to(conv_state.dtype)
    return out


@torch_cached_causal_conv1d.register_fake
def _(x, weight, bias, activation, conv_state, replay_conv, slots, cu_seqlens, has_state, replay_lens, is_verify):
    return torch.empty_like(x)
