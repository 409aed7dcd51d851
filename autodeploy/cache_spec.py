"""What a cached graph expects from the runtime: raw batch inputs and cache tensors.

Cache-insertion transforms add graph inputs and record a :class:`CacheSpec` per cache tensor in
the graph's record (``autodeploy.graph_record``); the runtime allocates the tensors from those
specs and passes them by name, after the raw batch inputs, in graph-input order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Raw per-step facts every cached graph receives after (input_ids [1, T], position_ids [1, T]):
#   seq_lens [B] int32     new tokens of each lane this step (0 for a padded lane)
#   cached_lens [B] int32  tokens of the lane's sequence already in the caches
#   slots [B] int32        sequence slot (0 = the null slot, for padded lanes)
#   page_table [B, P] int32  full-attention physical pages per lane (0 = the null page)
#   accepted_lens [B] int32  tokens of the lane's previous verify step that were accepted (its first
#                            token plus accepted drafts): replayed onto SSM/conv state first; else 0
#   verify [B] bool        the lane's tokens are a verify step (last token + drafts): the SSM/conv
#                            state is not advanced, their inputs go to the replay buffer
RAW_INPUTS = ("seq_lens", "cached_lens", "slots", "page_table", "accepted_lens", "verify")
STEP_INPUTS = ("input_ids", "position_ids", *RAW_INPUTS)  # what BatchInputs.fill produces

POOL_FULL = "kv_full"
POOL_REPLAY = "replay"  # per-slot replay buffers of speculative decoding


def swa_pool(window: int) -> str:
    return f"kv_swa_{window}"


def chunk_pool(chunk: int) -> str:
    """Block-local (chunked) attention layers with chunk C: per-slot rings bounded like a window of C."""
    return f"kv_chunk_{chunk}"


@dataclass(frozen=True)
class CacheSpec:
    """One cache tensor of the graph.

    kind "kv": a paged K or V pool, shape [pages, page_size, *shape]; pool names which pool
    ("kv_full", "kv_swa_<W>" or "kv_chunk_<C>") sizes it; window is the ring's bound (W, or C).
    kind "state": per-slot state, shape [slots, *shape]. ring_pages: a windowed kv pool's pages per
    slot, as the graph's prepare node addresses them: the pools allocate exactly that many.
    """

    name: str
    kind: str
    pool: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    window: int = 0
    ring_pages: int = 0
