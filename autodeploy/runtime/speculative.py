"""Speculative decoding: drafters and the acceptance rule.

A verify step feeds a sequence's last token plus K draft tokens; the target's logits at the
1 + K positions decide how many drafts are accepted (``accept``), and the engine commits the
last token, the accepted drafts and one token of the target's own (the bonus). SSM state is
never advanced by a verify step: the graph replays the accepted prefix onto it in the next step
(see custom_ops/torch_cached_ssm.py).

Drafters implement ``Drafter``: ``propose`` returns up to k tokens per request, with the
distribution each was drawn from when it was sampled (so acceptance stays exact under
sampling), and ``release`` forgets a finished request. Two ship: n-gram prompt lookup and a draft
model run by its own graph and caches. An MTP head would be a third.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from autodeploy.runtime.batch import LaneInput
from autodeploy.runtime.runner import GraphRunner
from autodeploy.runtime.sampling import SamplingParams, draw, target_probs


@dataclass
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None = None  # [len(tokens), vocab]: what each token was drawn from; None = chosen outright


@dataclass
class SpecDecodingStats:
    """Counts of one request (or all of them). ``mean_accepted_length`` counts the tokens one
    verify step commits: accepted drafts plus the target's own token."""

    num_verify_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return 1 + self.num_accepted_tokens / self.num_verify_steps if self.num_verify_steps else 0.0

    def add(self, other: SpecDecodingStats) -> None:
        self.num_verify_steps += other.num_verify_steps
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens


def accept(logits: torch.Tensor, draft: Draft, params: SamplingParams,
           generator: torch.Generator | None = None, argmax: list[int] | None = None) -> tuple[int, int]:
    """The target's verdict on ``draft`` from its logits at the 1 + k verify positions
    ([1 + k, vocab]): (accepted drafts, the target's next token after them).

    Greedy: the longest prefix equal to the target's argmax, then the argmax. Sampling: the
    speculative-sampling rule (Leviathan et al.; Chen et al.): draft token d drawn from q is kept
    with probability min(1, p(d) / q(d)); the first rejected one is replaced by a draw from
    normalise(max(p - q, 0)); if all are kept the next token is drawn from p. The committed tokens
    are then distributed exactly as sampling from p token by token. ``argmax``: the rows' argmax
    if the caller has it already (one device sync per step instead of one per lane)."""
    k = len(draft.tokens)
    if params.temperature == 0:
        target = argmax if argmax is not None else torch.argmax(logits, dim=-1).tolist()
        n = 0
        while n < k and draft.tokens[n] == target[n]:
            n += 1
        return n, target[n]
    p = target_probs(logits, params).cpu()
    for i, token in enumerate(draft.tokens):
        q = draft.probs[i].cpu() if draft.probs is not None else None
        q_token = q[token] if q is not None else 1.0
        u = torch.rand((), generator=generator)
        if u * q_token < p[i, token]:
            continue
        residual = p[i].clone()
        if q is not None:
            residual = torch.clamp_min(residual - q, 0)
        else:
            residual[token] = 0
        if residual.sum() <= 0:  # p == q up to rounding: any draw from p is exact
            residual = p[i]
        return i, draw(residual / residual.sum(), generator)
    return k, draw(p[k], generator)


class Drafter(ABC):
    """Proposes draft tokens for requests in decode."""

    max_draft_tokens: int

    @abstractmethod
    def propose(self, requests: Sequence, num_tokens: Sequence[int]) -> list[Draft]:
        """Up to ``num_tokens[i]`` drafts continuing ``requests[i].tokens``."""

    def release(self, request) -> None:
        """``request`` finished or was aborted: drop what is kept for it."""


class NgramDrafter(Drafter):
    """Prompt lookup: find the longest n-gram (``prompt_lookup_max`` down to ``prompt_lookup_min``)
    ending the sequence that occurred earlier in it, and propose what followed its latest
    occurrence. No model, no state."""

    def __init__(self, max_draft_tokens: int, prompt_lookup_min: int = 1, prompt_lookup_max: int = 4):
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min ({prompt_lookup_min}) <= prompt_lookup_max "
                             f"({prompt_lookup_max})")
        self.max_draft_tokens, self.lookup_min, self.lookup_max = max_draft_tokens, prompt_lookup_min, prompt_lookup_max

    def propose(self, requests, num_tokens):
        return [Draft(self.lookup(req.tokens, k) if k > 0 else []) for req, k in zip(requests, num_tokens)]

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        for n in range(min(self.lookup_max, len(tokens) - 1), self.lookup_min - 1, -1):
            suffix = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == suffix:
                    return tokens[start + n:start + n + k]
        return []


@dataclass
class _DraftSequence:
    slot: int
    pages: list[int]
    cached: int = 0  # tokens of the target's sequence committed in the draft's caches
    buffered: list[int] = field(default_factory=list)  # tokens of the draft's last verify lane (replayable)
    generator: torch.Generator | None = None


class DraftModelDrafter(Drafter):
    """A smaller model, run by its own cached graph and caches (``runner``), proposes k tokens
    autoregressively. It commits only tokens the target committed: its own guesses after the
    target's last token run as verify lanes (KV written but not counted, SSM state kept), each
    chain step re-feeding the guesses so far, and the next round replays those the target
    accepted, exactly as the target does. Draft caches per request are taken on first use and
    given back by ``release``."""

    def __init__(self, runner: GraphRunner, max_draft_tokens: int):
        self.runner, self.max_draft_tokens = runner, max_draft_tokens
        self.sequences: dict[int, _DraftSequence] = {}

    def _sequence(self, req) -> _DraftSequence:
        seq = self.sequences.get(req.request_id)
        if seq is None:
            pools = self.runner.pools
            total = len(req.prompt) + req.params.max_tokens
            pages = pools.pages.allocate(-(-total // self.runner.sizes.page_size)) if pools.pages.capacity else []
            generator = None
            if req.params.seed is not None:
                generator = torch.Generator().manual_seed(req.params.seed + 1)
            seq = self.sequences[req.request_id] = _DraftSequence(pools.slots.allocate()[0], pages, generator=generator)
        return seq

    def release(self, request) -> None:
        seq = self.sequences.pop(request.request_id, None)
        if seq is not None:
            self.runner.pools.slots.free([seq.slot])
            self.runner.pools.pages.free(seq.pages)

    def _choose(self, logits: torch.Tensor, params: SamplingParams, seq: _DraftSequence):
        if params.temperature == 0:
            return int(torch.argmax(logits)), None
        q = target_probs(logits, params)
        return draw(q, seq.generator), q

    def propose(self, requests, num_tokens):
        drafts = [Draft([]) for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        active = [i for i, k in enumerate(num_tokens) if k > 0]
        budget = self.runner.sizes.max_num_tokens
        # 1. catch up on the target's committed tokens; the last chunk's logits give the first draft
        seqs = {i: self._sequence(requests[i]) for i in active}
        replay: dict[int, int] = {}
        for i, seq in seqs.items():
            tokens, accepted = requests[i].tokens, 0
            while (accepted < len(seq.buffered) and seq.cached + accepted < len(tokens) - 1
                   and tokens[seq.cached + accepted] == seq.buffered[accepted]):
                accepted += 1
            seq.cached += accepted
            seq.buffered = []
            replay[i] = accepted
        behind = list(active)  # requests whose draft caches lag the target's tokens
        while behind:
            lanes = [LaneInput(requests[i].tokens[seqs[i].cached:seqs[i].cached + budget], seqs[i].cached,
                               seqs[i].slot, seqs[i].pages, accepted=replay.pop(i, 0)) for i in behind]
            for i, lane, logits in zip(behind, lanes, self.runner.run_in_batches(lanes)):
                seqs[i].cached += len(lane.tokens)
                if seqs[i].cached == len(requests[i].tokens):
                    token, q = self._choose(logits[-1], requests[i].params, seqs[i])
                    drafts[i].tokens.append(token)
                    probs[i].append(q)
            behind = [i for i in behind if seqs[i].cached < len(requests[i].tokens)]
        # 2. chain: feed the guesses so far as a verify lane, from the committed state
        for j in range(1, max(num_tokens, default=0)):
            chain = [i for i in active if num_tokens[i] > j]
            lanes = [LaneInput(drafts[i].tokens[:j], seqs[i].cached, seqs[i].slot, seqs[i].pages, verify=True)
                     for i in chain]
            for i, logits in zip(chain, self.runner.run_in_batches(lanes)):
                seqs[i].buffered = drafts[i].tokens[:j]
                token, q = self._choose(logits[-1], requests[i].params, seqs[i])
                drafts[i].tokens.append(token)
                probs[i].append(q)
        for i in active:
            if requests[i].params.temperature > 0:
                drafts[i].probs = torch.stack(probs[i])
        return drafts
