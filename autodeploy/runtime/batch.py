"""The raw inputs of one step: exactly what the graph receives, nothing derived.

Fixed maximum sizes, zero-initialised: a lane that carries no sequence has 0 new tokens, the
null slot and a row of null pages, so whatever the graph derives from it stays in range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autodeploy.cache_spec import STEP_INPUTS


@dataclass
class LaneInput:
    tokens: list[int]  # the new tokens of this sequence in this step
    cached_len: int  # tokens of the sequence already in the caches
    slot: int
    pages: list[int]  # full-attention pages of the sequence (may cover more than needed)
    accepted: int = 0  # tokens of the previous verify step that were accepted (replayed first)
    verify: bool = False  # tokens are [last token, drafts...]: SSM state kept, inputs stored for replay


class BatchInputs:
    """Persistent input buffers; ``fill`` writes one step's lanes and returns the graph inputs."""

    def __init__(self, max_batch_size: int, max_num_tokens: int, max_pages_per_seq: int, device="cpu"):
        self.max_batch_size, self.max_num_tokens = max_batch_size, max_num_tokens
        self.input_ids = torch.zeros(1, max_num_tokens, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(1, max_num_tokens, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
        self.cached_lens = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
        self.slots = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
        self.page_table = torch.zeros(max_batch_size, max_pages_per_seq, dtype=torch.int32, device=device)
        self.accepted_lens = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
        self.verify = torch.zeros(max_batch_size, dtype=torch.bool, device=device)

    def fill(self, lanes: list[LaneInput]) -> dict[str, torch.Tensor]:
        """Write the lanes into the buffers; returns the step's graph inputs by name (STEP_INPUTS)."""
        if len(lanes) > self.max_batch_size:
            raise ValueError(f"{len(lanes)} lanes > max_batch_size {self.max_batch_size}")
        ids, pos = [], []
        for lane in lanes:
            ids += lane.tokens
            pos += range(lane.cached_len, lane.cached_len + len(lane.tokens))
        T = len(ids)
        if T > self.max_num_tokens:
            raise ValueError(f"{T} tokens > max_num_tokens {self.max_num_tokens}")
        self.input_ids[0, :T] = torch.tensor(ids, dtype=torch.long)
        self.position_ids[0, :T] = torch.tensor(pos, dtype=torch.long)
        raw = (self.seq_lens, self.cached_lens, self.slots, self.page_table, self.accepted_lens, self.verify)
        for buf in raw:
            buf.zero_()
        for i, lane in enumerate(lanes):
            self.seq_lens[i] = len(lane.tokens)
            self.cached_lens[i] = lane.cached_len
            self.slots[i] = lane.slot
            self.accepted_lens[i] = lane.accepted
            self.verify[i] = lane.verify
            if lane.pages:
                self.page_table[i, : len(lane.pages)] = torch.tensor(lane.pages, dtype=torch.int32)
        return dict(zip(STEP_INPUTS, (self.input_ids[:, :T], self.position_ids[:, :T], *raw)))
