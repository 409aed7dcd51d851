"""Canonical Mamba2 SSD scan op: ``autodeploy::ssd_scan``.

The selective state-space recurrence of a Mamba2 mixer, per head h and step t:

    dt_t  = clamp(softplus(dt_t + dt_bias), dt_min, dt_max)      (softplus and bias optional)
    S_t   = exp(dt_t * A) * S_{t-1} + dt_t * x_t (outer) B_t      S: [head_dim, d_state]
    y_t   = S_t @ C_t + D * x_t

with B and C shared by the heads of a group. The torch reference runs it chunk by chunk (the
"state space dual" form used by transformers' ``mamba2_chunk_scan``): inside a chunk the output
is a masked, decayed C.B^T product; between chunks only the state is carried.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ssd_scan", "ssd_scan_reference", "discretize_dt"]


def discretize_dt(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
) -> torch.Tensor:
    """dt [..., h] -> clamp(softplus(dt + dt_bias)) in float32, as transformers' Mamba2 path does."""
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    return torch.clamp(dt, min=dt_min, max=dt_max).float()


def ssd_scan_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_min: float = 0.0,
    dt_max: float = float("inf"),
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan in float32 (float64 if x is float64).

    x: [b, s, h, p]; dt: [b, s, h]; A: [h] (negative); B, C: [b, s, g, n] with h % g == 0;
    D, dt_bias: [h]; initial_state: [b, h, p, n].
    Returns y [b, s, h, p] in x's dtype and the final state [b, h, p, n] in float32 (float64).
    """
    b, s, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"SSM heads ({h}) must be a multiple of groups ({g})")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    dt = discretize_dt(dt, dt_bias, dt_softplus, dt_min, dt_max).to(compute)
    xf = x.to(compute)
    Bf = B.to(compute).repeat_interleave(h // g, dim=2)  # [b, s, h, n]
    Cf = C.to(compute).repeat_interleave(h // g, dim=2)
    log_decay = dt * A.to(compute)  # [b, s, h]
    state = (
        initial_state.to(compute).clone()
        if initial_state is not None
        else x.new_zeros((b, h, p, n), dtype=compute)
    )
    ys = []
    for start in range(0, s, chunk_size):
        end = min(start + chunk_size, s)
        xc, dtc, Bc, Cc = xf[:, start:end], dt[:, start:end], Bf[:, start:end], Cf[:, start:end]
        cum = torch.cumsum(log_decay[:, start:end], dim=1)  # [b, l, h]
        # decay from source step j to target step i (i >= j): exp(cum_i - cum_j)
        diff = cum[:, :, None, :] - cum[:, None, :, :]  # [b, l_i, l_j, h]
        length = end - start
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        decay = torch.exp(diff.masked_fill(~causal[None, :, :, None], float("-inf")))
        scores = torch.einsum("bihn,bjhn->bijh", Cc, Bc) * decay * dtc[:, None, :, :]
        y_intra = torch.einsum("bijh,bjhp->bihp", scores, xc)
        y_inter = torch.einsum("bihn,bhpn->bihp", Cc, state) * torch.exp(cum)[..., None]
        ys.append(y_intra + y_inter)
        to_end = torch.exp(cum[:, -1:, :] - cum) * dtc  # [b, l, h]
        state = state * torch.exp(cum[:, -1, :])[:, :, None, None] + torch.einsum(
            "blh,blhp,blhn->bhpn", to_end, xc, Bc
        )
    y = torch.cat(ys, dim=1) if ys else xf.clone()
    if D is not None:
        y = y + xf * D.to(compute)[:, None]
    return y.to(x.dtype), state


@torch.library.custom_op("autodeploy::ssd_scan", mutates_args=())
def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba2 SSD scan; see :func:`ssd_scan_reference` for shapes. Returns (y, final_state)."""
    y, state = ssd_scan_reference(
        x, dt, A, B, C, D, dt_bias, initial_state, dt_softplus, dt_min, dt_max, chunk_size
    )
    return y, state.float()


@ssd_scan.register_fake
def _ssd_scan_fake(x, dt, A, B, C, D, dt_bias, initial_state, dt_softplus, dt_min, dt_max, chunk_size):
    b, _, h, p = x.shape
    n = B.shape[-1]
    return x.new_empty(x.shape), x.new_empty((b, h, p, n), dtype=torch.float32)
