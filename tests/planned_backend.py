"""A backend written the way a new one is added: its cached attention op (here the torch op behind
a host half's check) and a host half, named by one entry in autodeploy.backends.CACHED_OPS."""

from __future__ import annotations

import torch

from autodeploy.backends import host_half


class PlannedSteps:
    """A host half that counts the steps it planned and remembers the last step's lane lengths."""

    @classmethod
    def spec_for(cls, layer) -> tuple:
        return (layer.pool_window, layer.num_kv_heads, layer.head_dim)

    @classmethod
    def build(cls, spec, num_lanes: int, max_pages_per_lane: int, device) -> PlannedSteps:
        half = cls()
        half.spec, half.num_lanes = spec, num_lanes
        return half

    def __init__(self):
        self.planned = 0
        self.seq_lens: torch.Tensor | None = None

    def plan(self, host: dict[str, torch.Tensor], captured: bool) -> None:
        self.planned += 1
        self.seq_lens = host["seq_lens"].clone()


@torch.library.custom_op("autodeploy::planned_cached_attention", mutates_args=("k_cache", "v_cache"))
def planned_cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    write_idx: torch.Tensor, kv_start: torch.Tensor, kv_len: torch.Tensor, page_list: torch.Tensor,
    cu_seqlens: torch.Tensor, scale: float, sliding_window: int, soft_cap: float, sinks: torch.Tensor | None,
    plan_id: int,
) -> torch.Tensor:
    """torch_cached_attention, after checking that its host half planned this very step."""
    seq_lens = host_half(plan_id).seq_lens
    if seq_lens is None or not torch.equal(seq_lens.long().to(cu_seqlens.device), torch.diff(cu_seqlens)):
        raise RuntimeError(f"plan {plan_id} did not plan this step")
    return torch.ops.autodeploy.torch_cached_attention(q, k, v, k_cache, v_cache, write_idx, kv_start, kv_len,
                                                      page_list, cu_seqlens, scale, sliding_window, soft_cap, sinks)


@planned_cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, write_idx, kv_start, kv_len, page_list, cu_seqlens, scale, sliding_window,
      soft_cap, sinks, plan_id):
    return torch.empty_like(q)
