"""GraphRunner: one cached graph with its cache pools and input buffers; runs lanes.

The engine (and a draft model's drafter) hand it lanes; it writes the raw inputs, passes the
cache tensors by name, and returns the logits of every token of the step. Nothing derived is
computed here: the graph's prepare nodes do that.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from autodeploy.cache_spec import CacheSpec
from autodeploy.fx_utils import placeholder_names
from autodeploy.runtime.batch import BatchInputs, LaneInput
from autodeploy.runtime.pools import CachePools, PoolSizes


class GraphRunner:
    def __init__(self, gm: GraphModule, sizes: PoolSizes, device: torch.device | str = "cpu"):
        self.gm, self.sizes = gm, sizes
        specs: list[CacheSpec] = gm.meta.get("autodeploy_caches", [])
        self.pools = CachePools(specs, sizes, device)
        self.inputs = BatchInputs(sizes.max_batch_size, sizes.max_num_tokens, sizes.max_pages_per_seq, device)
        self.input_names = placeholder_names(gm)
        self.num_runs = 0

    @torch.no_grad()
    def run(self, lanes: list[LaneInput]) -> torch.Tensor:
        """Run one step over ``lanes``; returns logits [tokens of the step, vocab]."""
        by_name = self.inputs.fill(lanes)
        by_name.update(self.pools.tensors)
        self.num_runs += 1
        return self.gm(*[by_name[name] for name in self.input_names])[0]

    def run_in_batches(self, lanes: list[LaneInput]) -> list[torch.Tensor]:
        """Run ``lanes`` in as many steps as the lane and token limits need (each lane must fit a
        step on its own); returns each lane's logits [its tokens, vocab], in order."""
        out: list[torch.Tensor] = []
        start = 0
        while start < len(lanes):
            end, tokens = start, 0
            while (end < len(lanes) and end - start < self.sizes.max_batch_size
                   and tokens + len(lanes[end].tokens) <= self.sizes.max_num_tokens):
                tokens += len(lanes[end].tokens)
                end += 1
            if end == start:
                raise ValueError(f"a lane of {len(lanes[start].tokens)} tokens exceeds max_num_tokens "
                                 f"{self.sizes.max_num_tokens}")
            logits = self.run(lanes[start:end])
            offset = 0
            for lane in lanes[start:end]:
                out.append(logits[offset:offset + len(lane.tokens)])
                offset += len(lane.tokens)
            start = end
        return out
