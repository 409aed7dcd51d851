"""Prepare ops: derive every buffer the cached ops read from the raw batch facts, in the graph.

The runtime hands the graph only raw facts per step (flat token ids; per lane: new-token count,
cached length, sequence slot, full-attention page table, accepted tokens of its previous verify
step, whether it verifies drafts now). These ops turn them into kernel metadata, so every
execution path computes them the same way (the graph owns all buffer initialisation: eager,
warm-up, CUDA-graph capture and replay run the same prepare nodes). Pure tensor arithmetic: no
host sync, nothing read from outside the graph.

Lanes are fixed in number; a padded lane has 0 new tokens, slot 0 (the null slot) and a page-table
row of 0s (the null page), so everything it produces points inside the pools.
"""

from __future__ import annotations

import torch

__all__ = ["prepare_attention_metadata", "prepare_ssm_metadata", "prepare_logit_rows", "logit_row_counts",
           "swa_ring_pages", "attention_metadata_reference", "ssm_metadata_reference"]


def swa_ring_pages(window: int, max_num_tokens: int, page_size: int) -> int:
    """Pages in one slot's sliding-window ring: the W-1 keys before a step plus the step's tokens
    span at most ceil((W - 1 + T) / page) + 1 pages; one page more keeps the bound simple."""
    return -(-(window + max_num_tokens) // page_size) + 1


def _token_lanes(input_ids: torch.Tensor, seq_lens: torch.Tensor):
    lens = seq_lens.long()
    cu = torch.cat([lens.new_zeros(1), torch.cumsum(lens, 0)])
    num_tokens = input_ids.shape[-1]
    lane = torch.repeat_interleave(torch.arange(lens.shape[0], device=lens.device), lens, output_size=num_tokens)
    return cu, lane


@torch.library.custom_op("autodeploy::prepare_attention_metadata", mutates_args=())
def prepare_attention_metadata(
    input_ids: torch.Tensor,
    seq_lens: torch.Tensor,
    cached_lens: torch.Tensor,
    slots: torch.Tensor,
    page_table: torch.Tensor,
    page_size: int,
    window: int,
    ring_pages: int,
    attention_chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention metadata for one pool.

    input_ids: [1, T] (only its length is used); seq_lens, cached_lens, slots: [B] int32;
    page_table: [B, P] int32 physical pages of the full-attention pool.
    window = 0: full attention over ``page_table``. window = W > 0: the sliding-window pool, where
    slot s owns pages s*R .. s*R+R-1 (R = ``ring_pages``) and logical page p lives at s*R + p % R.
    attention_chunk = C > 0 (with window = C, the ring's bound): block-local attention; the first
    key a query of the step can see is the start of the first query's block, C * (cached // C).
    Returns (all int64):
      write_idx [T]     flat cache row (page * page_size + offset) each new token's K/V goes to
      kv_start [B]      first key position a query of this step can see (0 for full attention)
      kv_len [B]        keys after the write (cached + new)
      page_list [B, Pk] physical pages of logical pages kv_start // page_size, ... in order
      cu_seqlens [B+1]  token offsets of each lane
    """
    if seq_lens.is_cuda:  # one launch instead of ~20 small ops
        from autodeploy.custom_ops.triton_prepare_metadata import triton_prepare_attention_metadata

        return triton_prepare_attention_metadata(input_ids.shape[-1], seq_lens, cached_lens, slots, page_table,
                                                 page_size, window, ring_pages, attention_chunk)
    return attention_metadata_reference(input_ids, seq_lens, cached_lens, slots, page_table, page_size, window,
                                        ring_pages, attention_chunk)


def attention_metadata_reference(input_ids, seq_lens, cached_lens, slots, page_table, page_size: int, window: int,
                                 ring_pages: int, attention_chunk: int = 0):
    """``prepare_attention_metadata`` in torch ops (the CPU path and the Triton kernel's oracle)."""
    cu, lane = _token_lanes(input_ids, seq_lens)
    cached = cached_lens.long()
    pos = cached[lane] + torch.arange(lane.shape[0], device=lane.device) - cu[lane]
    logical_page, offset = pos // page_size, pos % page_size
    kv_len = cached + seq_lens.long()
    if window <= 0:
        table = page_table.to(torch.long, memory_format=torch.contiguous_format)
        phys = table[lane, logical_page]
        kv_start = torch.zeros_like(kv_len)
        page_list = table
    else:
        ring_base = slots.long() * ring_pages
        phys = ring_base[lane] + logical_page % ring_pages
        if attention_chunk > 0:  # the first query's block start: within W - 1 = C - 1 keys, like a window
            kv_start = cached // attention_chunk * attention_chunk
        else:
            kv_start = torch.clamp_min(cached - window + 1, 0)  # the window's first key, not an index
        first_page = kv_start // page_size
        steps = torch.arange(ring_pages, device=slots.device)
        page_list = ring_base[:, None] + (first_page[:, None] + steps[None, :]) % ring_pages
    return phys * page_size + offset, kv_start, kv_len, page_list, cu


@prepare_attention_metadata.register_fake
def _(input_ids, seq_lens, cached_lens, slots, page_table, page_size, window, ring_pages, attention_chunk=0):
    T, B = input_ids.shape[-1], seq_lens.shape[0]
    pk = page_table.shape[1] if window <= 0 else ring_pages
    i64 = dict(dtype=torch.int64)
    return (input_ids.new_empty(T, **i64), seq_lens.new_empty(B, **i64), seq_lens.new_empty(B, **i64),
            seq_lens.new_empty((B, pk), **i64), seq_lens.new_empty(B + 1, **i64))


@torch.library.custom_op("autodeploy::prepare_ssm_metadata", mutates_args=())
def prepare_ssm_metadata(
    input_ids: torch.Tensor, seq_lens: torch.Tensor, cached_lens: torch.Tensor, accepted_lens: torch.Tensor,
    verify: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SSM/conv metadata and replay work items, per lane:
      cu_seqlens [B+1] int64  token offsets
      has_state [B] bool      continue from the slot's state (cached tokens exist); a new sequence
                              starts from zeros, so a reused slot never leaks the previous state
      replay_lens [B] int64   tokens of the slot's replay buffer to fold into its state first
      is_verify [B] bool      the lane's tokens are drafts under verification: outputs only, the
                              state is not advanced and the tokens' inputs go to the replay buffer
    """
    if seq_lens.is_cuda:  # one launch instead of ~8 small ops
        from autodeploy.custom_ops.triton_prepare_metadata import triton_prepare_ssm_metadata

        return triton_prepare_ssm_metadata(seq_lens, cached_lens, accepted_lens, verify)
    return ssm_metadata_reference(input_ids, seq_lens, cached_lens, accepted_lens, verify)


def ssm_metadata_reference(input_ids, seq_lens, cached_lens, accepted_lens, verify):
    """``prepare_ssm_metadata`` in torch ops (the CPU path and the Triton kernel's oracle)."""
    cu, _ = _token_lanes(input_ids, seq_lens)
    return cu, cached_lens > 0, accepted_lens.long(), verify & (seq_lens > 0)


@prepare_ssm_metadata.register_fake
def _(input_ids, seq_lens, cached_lens, accepted_lens, verify):
    B = seq_lens.shape[0]
    return (seq_lens.new_empty(B + 1, dtype=torch.int64), seq_lens.new_empty(B, dtype=torch.bool),
            seq_lens.new_empty(B, dtype=torch.int64), seq_lens.new_empty(B, dtype=torch.bool))


def logit_row_counts(seq_lens: torch.Tensor, verify: torch.Tensor) -> torch.Tensor:
    """Per lane, how many rows of logits the engine reads: every token of a verify lane (1 + K
    draft positions), the last token of any other lane with tokens."""
    n = seq_lens.long()
    return torch.where(verify, n, (n > 0).long())


@torch.library.custom_op("autodeploy::prepare_logit_rows", mutates_args=())
def prepare_logit_rows(input_ids: torch.Tensor, seq_lens: torch.Tensor, verify: torch.Tensor,
                       rows_per_lane: int) -> torch.Tensor:
    """Token rows whose logits the step returns, lane after lane (see ``logit_row_counts``):
    [min(T, lanes * rows_per_lane)] int64, where rows_per_lane = 1 + the most draft tokens a verify
    lane carries. Entries past the used rows are padding and point at row 0 (computed, ignored)."""
    lanes, num_tokens = seq_lens.shape[0], input_ids.shape[-1]
    if seq_lens.is_cuda:  # one launch instead of the ~20 small ops below
        from autodeploy.custom_ops.triton_logit_rows import triton_logit_rows

        return triton_logit_rows(seq_lens, verify, min(num_tokens, lanes * rows_per_lane))
    used = logit_row_counts(seq_lens, verify)
    first = torch.cumsum(seq_lens.long(), 0) - used  # each lane's first returned token
    cu_used = torch.cumsum(used, 0)
    r = torch.arange(min(num_tokens, lanes * rows_per_lane), device=seq_lens.device)
    lane = torch.searchsorted(cu_used, r, right=True)
    valid = lane < lanes
    lane = torch.where(valid, lane, 0)  # padding rows: lane 0's arithmetic, then masked to row 0
    rows = first[lane] + r - (cu_used[lane] - used[lane])
    return torch.where(valid, rows, 0)


@prepare_logit_rows.register_fake
def _(input_ids, seq_lens, verify, rows_per_lane):
    return input_ids.new_empty(torch.sym_min(input_ids.shape[-1], seq_lens.shape[0] * rows_per_lane),
                               dtype=torch.int64)
