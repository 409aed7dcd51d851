"""The raw inputs of one step: exactly what the graph receives, nothing derived.

Fixed maximum sizes, zero-initialised: a lane that carries no sequence has 0 new tokens, the
null slot and a row of null pages, so whatever the graph derives from it stays in range. One lane
more than ``max_batch_size`` is reserved for padding: ``fill(lanes, pad_to=T)`` gives it the tokens
that bring the step to exactly T (a captured CUDA graph's size); it writes only the null page and
the null slot.
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
        lanes = max_batch_size + 1  # the last one pads steps to a captured size
        self.input_ids = torch.zeros(1, max_num_tokens, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(1, max_num_tokens, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(lanes, dtype=torch.int32, device=device)
        self.cached_lens = torch.zeros(lanes, dtype=torch.int32, device=device)
        self.slots = torch.zeros(lanes, dtype=torch.int32, device=device)
        self.page_table = torch.zeros(lanes, max_pages_per_seq, dtype=torch.int32, device=device)
        self.accepted_lens = torch.zeros(lanes, dtype=torch.int32, device=device)
        self.verify = torch.zeros(lanes, dtype=torch.bool, device=device)

    def fill(self, lanes: list[LaneInput], pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """Write the lanes into the buffers; returns the step's graph inputs by name (STEP_INPUTS).

        The host builds each buffer's contents once and copies it in one transfer per buffer."""
        if len(lanes) > self.max_batch_size:
            raise ValueError(f"{len(lanes)} lanes > max_batch_size {self.max_batch_size}")
        ids, pos = [], []
        for lane in lanes:
            ids += lane.tokens
            pos += range(lane.cached_len, lane.cached_len + len(lane.tokens))
        T = len(ids)
        total = T if pad_to is None else pad_to
        if not T <= total <= self.max_num_tokens:
            raise ValueError(f"{T} tokens (padded to {total}) > max_num_tokens {self.max_num_tokens}")
        ids += [0] * (total - T)
        pos += range(total - T)
        num_lanes, width = self.page_table.shape
        lane_facts = torch.zeros(5, num_lanes, dtype=torch.int32)
        table = torch.zeros(num_lanes, width, dtype=torch.int32)
        for i, lane in enumerate(lanes):
            lane_facts[:, i] = torch.tensor([len(lane.tokens), lane.cached_len, lane.slot, lane.accepted, lane.verify])
            if lane.pages:
                table[i, : len(lane.pages)] = torch.tensor(lane.pages, dtype=torch.int32)
        lane_facts[0, -1] = total - T  # the padding lane: null slot, null pages, from position 0
        self.input_ids[0, :total].copy_(torch.tensor(ids, dtype=torch.long), non_blocking=True)
        self.position_ids[0, :total].copy_(torch.tensor(pos, dtype=torch.long), non_blocking=True)
        for buf, row in zip((self.seq_lens, self.cached_lens, self.slots, self.accepted_lens), lane_facts[:4]):
            buf.copy_(row, non_blocking=True)
        self.verify.copy_(lane_facts[4].bool(), non_blocking=True)
        self.page_table.copy_(table, non_blocking=True)
        raw = (self.seq_lens, self.cached_lens, self.slots, self.page_table, self.accepted_lens, self.verify)
        return dict(zip(STEP_INPUTS, (self.input_ids[:, :total], self.position_ids[:, :total], *raw)))
