"""The raw inputs of one step: exactly what the graph receives, nothing derived.

Fixed maximum sizes, zero-initialised: a lane that carries no sequence has 0 new tokens, the
null slot and a row of null pages, so whatever the graph derives from it stays in range. One lane
more than ``max_batch_size`` is reserved for padding: ``fill(lanes, pad_to=T)`` gives it the tokens
that bring the step to exactly T (a captured CUDA graph's size); it writes only the null page and
the null slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
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


@dataclass
class DeviceTokens:
    """Input tokens that live on the device: step token ``offsets`` take the tokens that the
    previous step chose, at ``rows`` of its chosen-token tensor (async scheduling)."""

    offsets: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)

    def add(self, offset: int, row: int) -> None:
        self.offsets.append(offset)
        self.rows.append(row)

    def source(self, launched) -> tuple[torch.Tensor, list[int], list[int]] | None:
        """(chosen tokens of the step in flight, their rows, step offsets), or None if none."""
        return (launched.tokens, self.rows, self.offsets) if self.offsets else None


def logit_row_count(lane: LaneInput) -> int:
    """Rows of logits the step returns for ``lane``: every token of a verify lane, the last token
    of any other (the graph's ``prepare_logit_rows`` counts the same on the device)."""
    n = len(lane.tokens)
    return n if lane.verify else min(n, 1)


def logit_rows(lanes: list[LaneInput]) -> list[int]:
    """The token rows of a step whose logits the engine reads, lane after lane (each lane's last
    ``logit_row_count`` tokens)."""
    rows, start = [], 0
    for lane in lanes:
        n = len(lane.tokens)
        rows += range(start + n - logit_row_count(lane), start + n)
        start += n
    return rows


class BatchInputs:
    """Persistent input buffers; ``fill`` writes one step's lanes and returns the graph inputs."""

    def __init__(self, max_batch_size: int, max_num_tokens: int, max_pages_per_seq: int, device="cpu"):
        self.max_batch_size, self.max_num_tokens = max_batch_size, max_num_tokens
        lanes = max_batch_size + 1  # the last one pads steps to a captured size
        device = torch.device(device)
        pin = device.type == "cuda"
        # three device buffers (token ids + positions; every int32 lane fact and the page table; the
        # verify flags), each filled from a host staging copy in one transfer; the graph inputs are views
        self._tokens_host = torch.zeros(2, max_num_tokens, dtype=torch.long, pin_memory=pin)
        self._ints_host = torch.zeros(4 + max_pages_per_seq, lanes, dtype=torch.int32, pin_memory=pin)
        self._verify_host = torch.zeros(lanes, dtype=torch.bool, pin_memory=pin)
        self._tokens, self._ints = self._tokens_host.to(device), self._ints_host.to(device)
        self.verify = self._verify_host.to(device)
        self.input_ids, self.position_ids = self._tokens[0:1], self._tokens[1:2]
        self.seq_lens, self.cached_lens, self.slots, self.accepted_lens = self._ints[:4]
        self.page_table = self._ints[4:].T  # [lanes, max_pages_per_seq]
        self._copied = torch.cuda.Event() if pin else None  # staging is reused once the last copy is done
        self.host: dict[str, torch.Tensor] = {}  # the last step's raw inputs on the host, for host halves

    def copies_done(self) -> None:
        """Mark the stream position after which the staging buffers may be rewritten (called by
        fill, and again by the runner after host halves that copy from pinned memory of their own)."""
        if self._copied is not None:
            self._copied.record()

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
        facts = np.zeros((4, num_lanes), dtype=np.int32)
        table = np.zeros((num_lanes, width), dtype=np.int32)
        verify = np.zeros(num_lanes, dtype=bool)
        for i, lane in enumerate(lanes):
            facts[:, i] = (len(lane.tokens), lane.cached_len, lane.slot, lane.accepted)
            verify[i] = lane.verify
            if lane.pages:
                table[i, :len(lane.pages)] = lane.pages
        facts[0, -1] = total - T  # the padding lane: null slot, null pages, from position 0
        if self._copied is not None:
            self._copied.synchronize()
        self._tokens_host[0, :total] = torch.tensor(ids, dtype=torch.long)
        self._tokens_host[1, :total] = torch.tensor(pos, dtype=torch.long)
        self._ints_host[:4] = torch.from_numpy(facts)
        self._ints_host[4:] = torch.from_numpy(table.T)
        self._verify_host[:] = torch.from_numpy(verify)
        self._tokens[:, :total].copy_(self._tokens_host[:, :total], non_blocking=True)
        self._ints.copy_(self._ints_host, non_blocking=True)
        self.verify.copy_(self._verify_host, non_blocking=True)
        self.copies_done()
        # for host halves: the step's own arrays (new every step), not the staging, which is reused
        self.host = dict(zip(("seq_lens", "cached_lens", "slots", "accepted_lens"), torch.from_numpy(facts)),
                         verify=torch.from_numpy(verify), page_table=torch.from_numpy(table))
        raw = (self.seq_lens, self.cached_lens, self.slots, self.page_table, self.accepted_lens, self.verify)
        return dict(zip(STEP_INPUTS, (self.input_ids[:, :total], self.position_ids[:, :total], *raw)))
