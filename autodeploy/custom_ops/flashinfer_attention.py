"""Cached attention, flashinfer backend: ``autodeploy::flashinfer_cached_attention``.

Device half: the op writes the step's K/V at ``write_idx`` (from the graph's prepare node, like
every backend) and runs flashinfer's paged prefill kernel, which serves decode, verify and
prefill lanes of one step in one launch. Host half: :class:`AttentionPlan` runs the graph's own
``prepare_attention_metadata`` on the step's raw inputs on the host and turns its window starts
and page lists into flashinfer's CSR page lists (keys from the window's first page on, flashinfer
aligning queries to the end of the listed keys), then calls ``plan()``. It is this backend's host
half in ``autodeploy.backends`` (``HostHalf``): insert_cached_attention records one spec per
group of layers, the runner builds one plan per ``plan_id`` the graph recorded and calls them all
before every run: eager steps, warm-up, capture and replay.

The op finds its plan through ``autodeploy.backends.host_half(plan_id)``: a custom op takes only
tensors and scalars, so the plan object itself cannot be an argument, and the id is what the graph
can carry. The id table is generic (every backend with a host half uses it) and owned by
backends.py, which fills it when the runner builds the halves and refers to them weakly: the
runner that owns the plans decides how long they live, and this module keeps no plan state. (Its
one shared buffer, the float workspace per device, is scratch that every plan may use in turn,
layers running one after another on one stream.)

A captured CUDA graph bakes the wrapper's buffers and schedule in, so plans keep two wrappers: one
in CUDA-graph mode (fixed lane count, buffers sized for the largest step, planned first at the
largest capture size, as flashinfer requires) for captured sizes, one plain for larger steps.
Layers with the same pool, heads and parameters share a plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autodeploy.backends import host_half
from autodeploy.custom_ops.attention import CachedAttentionLayer

__all__ = ["flashinfer_cached_attention", "AttentionPlan", "AttentionPlanSpec"]

WORKSPACE_BYTES = 256 << 20


@dataclass(frozen=True)
class AttentionPlanSpec:
    """What a plan needs to know about its layers; recorded by insert_cached_attention."""

    page_size: int
    pool_window: int  # 0: the full pool; W: the sliding-window rings of ``ring_pages`` pages per slot
    ring_pages: int
    window: int  # the layers' sliding window (0: none)
    scale: float
    soft_cap: float
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype


def csr_page_lists(spec: AttentionPlanSpec, host: dict[str, torch.Tensor]):
    """flashinfer's (qo_indptr, kv_indptr, kv_indices, last_page_len), int32 on the host, from the
    step's raw inputs: the keys of each lane from its first visible page on. The window starts and
    page lists come from the graph's own prepare op, run here on the host tensors, so the two
    halves cannot disagree."""
    from autodeploy.custom_ops.prepare_metadata import prepare_attention_metadata

    p, n = spec.page_size, host["seq_lens"].long()
    tokens = torch.empty(1, int(n.sum()), dtype=torch.long)  # only its length is read
    _, kv_start, kv_len, pages, qo_indptr = prepare_attention_metadata(
        tokens, host["seq_lens"], host["cached_lens"], host["slots"], host["page_table"], p, spec.pool_window,
        spec.ring_pages)
    width = pages.shape[1]
    span = kv_len - kv_start // p * p  # keys from the first listed page on
    npages = torch.where(n > 0, -(-span // p), 0)  # lanes without queries list no keys
    if int(npages.max()) > width:
        raise ValueError(f"a lane needs {int(npages.max())} pages, more than its page list holds ({width})")
    last = torch.where(npages > 0, span - (npages - 1) * p, 0)
    kv_indptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(npages, 0)])
    kv_indices = pages[torch.arange(width)[None, :] < npages[:, None]]
    return (qo_indptr.int(), kv_indptr.int(), kv_indices.int(), last.int())


class AttentionPlan:
    """The host half of one group of flashinfer attention layers (see the module docstring)."""

    _workspace: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def spec_for(cls, layer: CachedAttentionLayer) -> AttentionPlanSpec:
        """The plan spec of one cached attention layer; layers with equal specs share a plan."""
        if layer.chunk > 0:
            raise ValueError(f"the flashinfer backend has no block-local (chunked) attention ({layer.name}); use "
                             "attn_backend='triton' or 'torch'")
        if layer.has_sinks:
            raise ValueError(f"the flashinfer backend does not take attention sinks ({layer.name}); use "
                             "attn_backend='triton'")
        return AttentionPlanSpec(layer.page_size, layer.pool_window, layer.ring_pages, layer.window, layer.scale,
                                 layer.soft_cap, layer.num_q_heads, layer.num_kv_heads, layer.head_dim, layer.dtype)

    @classmethod
    def build(cls, spec: AttentionPlanSpec, num_lanes: int, max_pages_per_lane: int, device) -> AttentionPlan:
        """The plan of ``spec`` for a runner of ``num_lanes`` lanes (``backends.build_host_halves``
        registers it under its id)."""
        return cls(spec, num_lanes, max_pages_per_lane, device)

    def __init__(self, spec: AttentionPlanSpec, num_lanes: int, max_pages_per_lane: int, device):
        import flashinfer

        self.spec, self.num_lanes, self.device = spec, num_lanes, torch.device(device)
        self.capacity = num_lanes * (spec.ring_pages if spec.pool_window > 0 else max_pages_per_lane)
        ws = self._workspace.get(self.device)
        if ws is None:  # one float workspace per device: layers run one after another on one stream
            ws = self._workspace[self.device] = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self._flashinfer, self.workspace = flashinfer, ws
        self.eager = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        self.graphed = None  # created at the first capture
        self.active = self.eager

    def plan(self, host: dict[str, torch.Tensor], captured: bool) -> None:
        qo_indptr, kv_indptr, kv_indices, last = csr_page_lists(self.spec, host)
        if captured and self.graphed is None:
            i32 = dict(dtype=torch.int32, device=self.device)
            self.graphed = self._flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True,
                qo_indptr_buf=torch.zeros(self.num_lanes + 1, **i32),
                paged_kv_indptr_buf=torch.zeros(self.num_lanes + 1, **i32),
                paged_kv_indices_buf=torch.zeros(self.capacity, **i32),
                paged_kv_last_page_len_buf=torch.zeros(self.num_lanes, **i32))
        self.active = self.graphed if captured else self.eager
        s = self.spec
        # the longest query run given, or plan() loops over lanes in Python for it; not the longest
        # key list (max_sequence_kv): in 0.6.18 that skips computing the host key lengths its fa2
        # scheduler then reads (UnboundLocalError, found on the H100)
        self.active.plan(
            qo_indptr, kv_indptr, kv_indices, last, s.num_q_heads, s.num_kv_heads, s.head_dim, s.page_size,
            max_token_per_sequence=int(host["seq_lens"].max()), causal=True, sm_scale=s.scale,
            window_left=s.window - 1 if s.window > 0 else -1,
            logits_soft_cap=s.soft_cap if s.soft_cap > 0 else None, q_data_type=s.dtype, kv_data_type=s.dtype)


@torch.library.custom_op("autodeploy::flashinfer_cached_attention", mutates_args=("k_cache", "v_cache"))
def flashinfer_cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    write_idx: torch.Tensor, kv_start: torch.Tensor, kv_len: torch.Tensor, page_list: torch.Tensor,
    cu_seqlens: torch.Tensor, scale: float, sliding_window: int, soft_cap: float, sinks: torch.Tensor | None,
    plan_id: int,
) -> torch.Tensor:
    """Same inputs and result as ``autodeploy::torch_cached_attention``, plus the id of the host
    half that planned this step (kv_start, kv_len, page_list and cu_seqlens are what the plan
    derived on the host; checked mode range-checks them like every backend's)."""
    _, hkv, d = k_cache.shape[1:]
    k_cache.view(-1, hkv, d).index_copy_(0, write_idx, k[0].to(k_cache.dtype))
    v_cache.view(-1, hkv, d).index_copy_(0, write_idx, v[0].to(v_cache.dtype))
    out = torch.empty(q.shape[1:], dtype=q.dtype, device=q.device)
    host_half(plan_id).active.run(q[0].contiguous(), (k_cache, v_cache), out=out)
    return out[None]


@flashinfer_cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, write_idx, kv_start, kv_len, page_list, cu_seqlens, scale, sliding_window,
      soft_cap, sinks, plan_id):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
