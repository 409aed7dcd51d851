"""Cached SSD scan, flashinfer backend: ``autodeploy::flashinfer_cached_ssd_scan``.

Same signature and semantics as ``autodeploy::torch_cached_ssd_scan`` (the oracle). The lanes of a
step that are plain decode steps (one token, a cached state, nothing to replay, not verifying)
go through flashinfer's ``mamba.selective_state_update``, the bandwidth-bound single-token kernel;
every other lane (prefill chunks, verify lanes, replays, new sequences) goes through the Triton
scan, told to leave the decode lanes alone. Which lane is which is computed on the device from the
prepare node's work items, by one small Triton kernel that also gathers the decode kernel's inputs,
so the op never syncs with the host and is CUDA-graph safe: the decode kernel runs over every
lane, the others pointing at flashinfer's pad slot (read as zeros, never written), and its outputs
land in one spare row past the step's tokens.

flashinfer's conventions (selective_state_update): per-head A, D and dt_bias expanded over head_dim
with stride 0 ("tie_hdim"), D and dt_bias in dt's dtype. dt is not clamped by the kernel, so a
model with a dt limit other than (0, inf), or a step with more lanes than the pool has state slots
(flashinfer checks ``state.size(0) >= batch``), runs every lane through the Triton scan. The causal
conv of the flashinfer SSM backend is the Triton one (flashinfer has no cached conv1d).
"""

from __future__ import annotations

import math

import torch

__all__ = ["flashinfer_cached_ssd_scan", "decode_lane_inputs", "selective_state_update_reference"]

PAD_SLOT = -1


def decode_lane_inputs(x, dt, B, C, slots, cu_seqlens, has_state, replay_lens, is_verify):
    """Which lanes are plain decode lanes (one token, continuing a cached state, nothing to replay,
    not verifying) and the decode kernel's inputs, in one launch per layer (the same selection in
    torch ops was ~12 small kernels per layer): ``(plain [lanes] bool, state indices [lanes] int64
    (PAD_SLOT for the other lanes), output rows [lanes] int64 (num_tokens, the spare row, for the
    others), x [lanes, h, p], dt [lanes, h], B [lanes, g, n], C [lanes, g, n])`` gathered from each
    plain lane's token (the others read token 0)."""
    import triton

    from autodeploy.custom_ops.triton_decode_lanes import decode_lane_inputs_kernel

    lanes, (num_tokens, h, p), (g, n) = slots.shape[0], x.shape[1:], B.shape[2:]
    dev = x.device
    plain = torch.empty(lanes, dtype=torch.uint8, device=dev)
    state_idx, out_rows = (torch.empty(lanes, dtype=torch.int64, device=dev) for _ in range(2))
    x_d = torch.empty(lanes, h, p, dtype=x.dtype, device=dev)
    dt_d = torch.empty(lanes, h, dtype=dt.dtype, device=dev)
    B_d, C_d = (torch.empty(lanes, g, n, dtype=t.dtype, device=dev) for t in (B, C))

    def as_u8(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.uint8) if t.dtype == torch.bool else t

    decode_lane_inputs_kernel[(lanes,)](
        x[0], dt[0], B[0], C[0], slots, cu_seqlens, as_u8(has_state), replay_lens, as_u8(is_verify),
        plain, state_idx, out_rows, x_d, dt_d, B_d, C_d, num_tokens,
        *x[0].stride(), *dt[0].stride(), *B[0].stride(), *C[0].stride(),
        H=h, P=p, G=g, N=n, BLOCK_HP=triton.next_power_of_2(h * p), BLOCK_GN=triton.next_power_of_2(g * n),
        BLOCK_H=triton.next_power_of_2(h), PAD=PAD_SLOT)
    return plain.view(torch.bool), state_idx, out_rows, x_d, dt_d, B_d, C_d


def selective_state_update_reference(state, x, dt, A, B, C, D, dt_bias=None, dt_softplus=False,
                                     state_batch_indices=None, pad_slot_id=PAD_SLOT):
    """flashinfer's decode kernel in torch (the tests' stand-in where flashinfer cannot run), with
    its argument conventions: x [b, h, p]; dt [b, h, p] and A [h, p, n], D/dt_bias [h, p] expanded
    over p; B, C [b, g, n]; state [slots, h, p, n] updated in place at ``state_batch_indices``
    (pad lanes read zeros and write nothing)."""
    b, h, p = x.shape
    g = B.shape[1]
    if state.shape[0] < b:
        raise RuntimeError("state.size(0) must be >= x.size(0)")  # flashinfer's shape check
    idx = state_batch_indices.long()
    pad = idx == pad_slot_id
    s = torch.where(pad[:, None, None, None], 0.0, state[idx.clamp_min(0)].float())
    dtv = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    if dt_softplus:
        dtv = torch.nn.functional.softplus(dtv)
    Bh = B.float().repeat_interleave(h // g, dim=1)  # [b, h, n]
    Ch = C.float().repeat_interleave(h // g, dim=1)
    s = s * torch.exp(dtv[..., None] * A.float()[None]) + (dtv * x.float())[..., None] * Bh[:, :, None, :]
    out = (s * Ch[:, :, None, :]).sum(-1) + D.float()[None] * x.float()
    keep = idx[~pad]
    state[keep] = s[~pad].to(state.dtype)
    return out.to(x.dtype)


def _decode_kernel():
    import flashinfer.mamba

    return flashinfer.mamba.selective_state_update


def scan_with_decode_kernel(kernel, x, dt, A, B, C, D, dt_bias, ssm_state, replay_x, replay_dt, replay_B, slots,
                            cu_seqlens, has_state, replay_lens, is_verify, dt_softplus, dt_min, dt_max, chunk_size):
    """The op's body with ``kernel`` as the single-token decode kernel (flashinfer's on the GPU)."""
    from autodeploy.custom_ops.triton_ssd_scan import launch_cached_ssd_scan

    num_tokens, h, p = x.shape[1:]
    n = ssm_state.shape[-1]
    args = (x, dt, A, B, C, D, dt_bias, ssm_state, replay_x, replay_dt, replay_B, slots, cu_seqlens, has_state,
            replay_lens, is_verify, dt_softplus, dt_min, dt_max, chunk_size)
    lanes = cu_seqlens.shape[0] - 1  # the kernel wants a state row per lane (its shape check)
    if num_tokens == 0 or D is None or dt_min > 0.0 or not math.isinf(dt_max) or lanes > ssm_state.shape[0]:
        return launch_cached_ssd_scan(*args)
    plain, state_idx, out_rows, x_d, dt_d, B_d, C_d = decode_lane_inputs(x, dt, B, C, slots, cu_seqlens, has_state,
                                                                         replay_lens, is_verify)
    y_rows = torch.empty(num_tokens + 1, h, p, dtype=x.dtype, device=x.device)  # row T: the spare row
    launch_cached_ssd_scan(*args, y=y_rows[:num_tokens][None], skip=plain)
    out = kernel(
        ssm_state, x_d, dt_d[..., None].expand(-1, h, p), A.float()[:, None, None].expand(h, p, n),
        B_d, C_d, D.to(dt.dtype)[:, None].expand(h, p),
        dt_bias=dt_bias.to(dt.dtype)[:, None].expand(h, p) if dt_bias is not None else None,
        dt_softplus=bool(dt_softplus), state_batch_indices=state_idx, pad_slot_id=PAD_SLOT)
    y_rows.index_copy_(0, out_rows, out.to(x.dtype))  # plain lanes' rows; the others all land in row T
    return y_rows[:num_tokens][None]


@torch.library.custom_op("autodeploy::flashinfer_cached_ssd_scan", mutates_args=("ssm_state", "replay_x", "replay_dt",
                                                                                 "replay_B"))
def flashinfer_cached_ssd_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None,
    dt_bias: torch.Tensor | None, ssm_state: torch.Tensor, replay_x: torch.Tensor | None,
    replay_dt: torch.Tensor | None, replay_B: torch.Tensor | None, slots: torch.Tensor, cu_seqlens: torch.Tensor,
    has_state: torch.Tensor, replay_lens: torch.Tensor, is_verify: torch.Tensor, dt_softplus: bool, dt_min: float,
    dt_max: float, chunk_size: int,
) -> torch.Tensor:
    """See the module docstring; shapes as ``autodeploy::triton_cached_ssd_scan``."""
    return scan_with_decode_kernel(_decode_kernel(), x, dt, A, B, C, D, dt_bias, ssm_state, replay_x, replay_dt,
                                   replay_B, slots, cu_seqlens, has_state, replay_lens, is_verify, dt_softplus,
                                   dt_min, dt_max, chunk_size)


@flashinfer_cached_ssd_scan.register_fake
def _(x, dt, A, B, C, D, dt_bias, ssm_state, replay_x, replay_dt, replay_B, slots, cu_seqlens, has_state,
      replay_lens, is_verify, dt_softplus, dt_min, dt_max, chunk_size):
    return torch.empty_like(x)
