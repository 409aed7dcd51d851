"""Checked mode: device-side range checks of the metadata prepare nodes hand to cached ops.

Each op asserts (``torch._assert_async``: an exception on the CPU, a device assert on a GPU, no
host sync) that every index a kernel will use lies inside the tensor it indexes, and returns
copies of the checked tensors; ``insert_index_checks`` rewires the cached ops to read those
copies, so a check can neither be dead-code-eliminated nor reordered after its consumer.
"""

from __future__ import annotations

import torch

__all__ = ["check_attention_metadata", "check_ssm_metadata", "check_positions"]


def _assert(ok: torch.Tensor, message: str) -> None:
    torch._assert_async(ok, f"autodeploy checked mode: {message}")


@torch.library.custom_op("autodeploy::check_attention_metadata", mutates_args=())
def check_attention_metadata(
    write_idx: torch.Tensor, page_list: torch.Tensor, kv_start: torch.Tensor, kv_len: torch.Tensor,
    k_cache: torch.Tensor, what: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """write_idx rows and page_list pages inside ``k_cache`` ([pages, page_size, ...]); every
    lane's key range [kv_start, kv_len) covered by its page list."""
    pages, page_size = k_cache.shape[0], k_cache.shape[1]
    _assert(((write_idx >= 0) & (write_idx < pages * page_size)).all(), f"{what}: a KV write row is outside the pool")
    _assert(((page_list >= 0) & (page_list < pages)).all(), f"{what}: a page index is outside the pool")
    span = kv_len - (kv_start // page_size) * page_size
    _assert(((kv_start >= 0) & (kv_start <= kv_len) & (span <= page_list.shape[1] * page_size)).all(),
            f"{what}: a lane's keys are not covered by its page list")
    return write_idx.clone(), page_list.clone(), kv_start.clone(), kv_len.clone()


@check_attention_metadata.register_fake
def _(write_idx, page_list, kv_start, kv_len, k_cache, what):
    return (torch.empty_like(write_idx), torch.empty_like(page_list), torch.empty_like(kv_start),
            torch.empty_like(kv_len))


@torch.library.custom_op("autodeploy::check_ssm_metadata", mutates_args=())
def check_ssm_metadata(
    slots: torch.Tensor, cu_seqlens: torch.Tensor, has_state: torch.Tensor, replay_lens: torch.Tensor,
    is_verify: torch.Tensor, state: torch.Tensor, replay_capacity: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """slots inside the per-slot ``state``; replay counts and verify lanes within the replay
    buffer's ``replay_capacity`` tokens (0: no speculation, so neither may occur); replays only
    onto sequences with a cached state."""
    _assert(((slots >= 0) & (slots < state.shape[0])).all(), "a sequence slot is outside the state cache")
    _assert((has_state | (replay_lens == 0)).all(), "a lane replays onto a sequence with no cached state")
    n = cu_seqlens[1:] - cu_seqlens[:-1]
    _assert(((replay_lens >= 0) & (replay_lens <= replay_capacity)).all(),
            f"a replay count exceeds the replay buffer ({replay_capacity} tokens per slot)")
    _assert((~is_verify | (n <= replay_capacity)).all(),
            f"a verify lane has more tokens than the replay buffer holds ({replay_capacity})")
    return slots.clone(), replay_lens.clone()


@check_ssm_metadata.register_fake
def _(slots, cu_seqlens, has_state, replay_lens, is_verify, state, replay_capacity):
    return torch.empty_like(slots), torch.empty_like(replay_lens)


@torch.library.custom_op("autodeploy::check_positions", mutates_args=())
def check_positions(position_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Every position indexes a row of the rope ``table`` ([positions, rotary_dim])."""
    _assert(((position_ids >= 0) & (position_ids < table.shape[0])).all(),
            f"a position is outside the rope tables ({table.shape[0]} positions)")
    return position_ids.clone()


@check_positions.register_fake
def _(position_ids, table):
    return torch.empty_like(position_ids)
