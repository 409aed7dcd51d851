"""Fast uncached implementations of the canonical ops, which the backend lowers them to: SDPA for
attention, the torch or Triton scan and conv for Mamba2."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import autodeploy.custom_ops  # noqa: F401  (registers the canonical ops)
from autodeploy.custom_ops.attention import causal_mask


def sdpa_attention(q, k, v, scale: float, sliding_window: int = 0, soft_cap: float = 0.0, sinks=None,
                   attention_chunk: int = 0):
    """``autodeploy::attention`` through ``F.scaled_dot_product_attention`` (no soft-cap, no sinks).

    q: [b, sq, hq, d]; k, v: [b, skv, hkv, d]; queries aligned to the end of the keys.
    """
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    sq, skv = q.shape[1], k.shape[1]
    gqa = q.shape[2] != k.shape[2]
    if sliding_window > 0 or attention_chunk > 0 or sq != skv:
        mask = causal_mask(sq, skv, sliding_window, attention_chunk, q.device)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def torch_ssd_scan(x, dt, A, B, C, D, dt_bias, initial_state, dt_softplus, dt_min, dt_max, chunk_size):
    """``autodeploy::ssd_scan`` (its torch reference) on a contiguous ``x``: the op's fake kernel
    gives y x's strides while the reference returns it contiguous, a mismatch inductor rejects."""
    return torch.ops.autodeploy.ssd_scan(x.contiguous(), dt, A, B, C, D, dt_bias, initial_state, dt_softplus,
                                         dt_min, dt_max, chunk_size)


def _one_shot_lanes(b: int, s, device) -> dict[str, torch.Tensor]:
    """Cached-op metadata for b fresh sequences of s tokens each, one lane (and slot) per row."""
    return dict(
        slots=torch.arange(b, dtype=torch.int32, device=device),
        cu_seqlens=torch.arange(b + 1, dtype=torch.int64, device=device) * s,
        replay_lens=torch.zeros(b, dtype=torch.int64, device=device),
        is_verify=torch.zeros(b, dtype=torch.bool, device=device),
    )


def triton_ssd_scan(x, dt, A, B, C, D, dt_bias, initial_state, dt_softplus, dt_min, dt_max, chunk_size):
    """``autodeploy::ssd_scan`` on autodeploy's Triton kernel: one lane per batch row, the final
    states written into a scratch state cache."""
    from autodeploy.custom_ops.triton_ssd_scan import triton_cached_ssd_scan  # noqa: F401  (registers)

    b, s, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if initial_state is not None:
        state = initial_state.float().clone()
    else:
        state = x.new_zeros((b, h, p, n), dtype=torch.float32)
    lanes = _one_shot_lanes(b, s, x.device)
    has_state = torch.full((b,), initial_state is not None, dtype=torch.bool, device=x.device)
    y = torch.ops.autodeploy.triton_cached_ssd_scan(
        x.reshape(1, b * s, h, p), dt.reshape(1, b * s, h), A, B.reshape(1, b * s, g, n),
        C.reshape(1, b * s, g, n), D, dt_bias, state, None, None, None, lanes["slots"],
        lanes["cu_seqlens"], has_state, lanes["replay_lens"], lanes["is_verify"], dt_softplus,
        dt_min, dt_max, chunk_size,
    )
    return y.reshape(b, s, h, p), state


def triton_causal_conv1d(x, weight, bias, activation: str):
    """``autodeploy::causal_conv1d`` on autodeploy's Triton kernel (silu or no activation)."""
    from autodeploy.custom_ops.triton_causal_conv1d import triton_cached_causal_conv1d  # noqa: F401

    b, c, s = x.shape
    k = weight.shape[1]
    tokens = x.transpose(0, 1).reshape(1, c, b * s)  # lane-major token columns
    conv_state = x.new_zeros((b, c, k - 1))
    lanes = _one_shot_lanes(b, s, x.device)
    out = torch.ops.autodeploy.triton_cached_causal_conv1d(
        tokens, weight, bias, activation, conv_state, None, lanes["slots"], lanes["cu_seqlens"],
        torch.zeros(b, dtype=torch.bool, device=x.device), lanes["replay_lens"], lanes["is_verify"],
    )
    return out.reshape(c, b, s).transpose(0, 1)


def check_single_sequence_positions(position_ids: torch.Tensor) -> None:
    """Runtime guard of a matched mask that was read off ``position_ids``: transformers builds a
    packed-sequence (block-diagonal) mask when positions restart inside a row; the matched causal
    attention does not, so such inputs must fail loudly instead of giving wrong logits."""
    steps = torch.diff(position_ids, dim=-1)
    torch._assert_async(
        torch.all(steps == 1),
        "autodeploy backend: position_ids are not one contiguous run per row (packed sequences?); "
        "the matched causal attention assumes one sequence per row. Compile with "
        "options={'match_attention': False} for packed inputs.",
    )
