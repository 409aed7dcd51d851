"""Rotary position embedding as one op: ``autodeploy::rope(q, k, position_ids, cos, sin, token_dim)``.

transformers computes cos/sin from the positions every step (a few small ops) and rotates q and k
with ``x * cos + rotate_half(x) * sin`` (five ops each). The RoPE transform evaluates the model's
own cos/sin computation once for every position into two tables ([positions, rotary_dim], in the
dtype the model used), so this op only gathers rows by ``position_ids`` (a raw graph input) and
rotates q and k together. ``rotary_dim`` < head_dim (partial rotary) rotates the leading channels
and passes the rest through. Any rope scaling (linear, llama3, yarn, per-layer bases) is whatever
the model's own code produced in the tables. Each output has the layout ``torch.empty_like`` gives
its input (a transposed ``[1, heads, T, d]`` view stays transposed) on every path and in the fake
implementation, so compiled graphs see the strides they were traced with.
"""

from __future__ import annotations

import torch

__all__ = ["rope", "rope_reference", "rope_body"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _broadcast(table: torch.Tensor, position_ids: torch.Tensor, like: torch.Tensor, token_dim: int) -> torch.Tensor:
    rows = table[position_ids.reshape(-1)]  # [T, rotary_dim]
    shape = [1] * like.dim()
    shape[token_dim], shape[-1] = rows.shape
    return rows.view(shape)


def rope_reference(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, token_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb with cos/sin gathered from the tables."""
    rd = cos.shape[-1]

    def apply(x: torch.Tensor) -> torch.Tensor:
        c, s = _broadcast(cos, position_ids, x, token_dim), _broadcast(sin, position_ids, x, token_dim)
        rot = x[..., :rd]
        out = rot * c + _rotate_half(rot) * s
        return out if rd == x.shape[-1] else torch.cat((out, x[..., rd:]), dim=-1)

    return apply(q), apply(k)


def _rope_torch(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                token_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope_reference` with the rows gathered once for q and k and ``rotate_half(x) * sin``
    as ``roll(x, d/2) * [-sin_1, sin_2]`` (a sign flip is exact: the same values, fewer launches)."""
    rd, half = cos.shape[-1], cos.shape[-1] // 2
    ids = position_ids.reshape(-1)
    c, s = cos.index_select(0, ids), sin.index_select(0, ids)  # [T, rotary_dim]
    s = torch.cat((-s[:, :half], s[:, half:]), dim=-1)

    def apply(x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[token_dim], shape[-1] = c.shape
        rot = x[..., :rd]
        out = rot * c.view(shape) + torch.roll(rot, half, dims=-1) * s.view(shape)
        return out if rd == x.shape[-1] else torch.cat((out, x[..., rd:]), dim=-1)

    return apply(q), apply(k)


def rope_body(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              token_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``autodeploy::rope`` runs; fused ops call it as a plain function (no dispatch)."""
    if q.is_cuda:
        from autodeploy.custom_ops.triton_rope import triton_rope

        return triton_rope(q, k, position_ids, cos, sin, token_dim)
    q_out, k_out = _rope_torch(q, k, position_ids, cos, sin, token_dim)
    return _laid_out_like(q_out, q), _laid_out_like(k_out, k)


@torch.library.custom_op("autodeploy::rope", mutates_args=())
def rope(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         token_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [1, hq, T, d] or [1, T, hq, d] (``token_dim`` says which); k likewise; position_ids: [1, T];
    cos, sin: [max positions, rotary_dim]. Returns rotated (q, k), same shapes and dtypes."""
    return rope_body(q, k, position_ids, cos, sin, token_dim)


def _laid_out_like(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``out`` in ``torch.empty_like(like)``'s layout (a copy only where the strides differ)."""
    target = torch.empty_like(like)
    if out.stride() == target.stride():
        return out
    return target.copy_(out)


@rope.register_fake
def _(q, k, position_ids, cos, sin, token_dim):
    return torch.empty_like(q), torch.empty_like(k)
