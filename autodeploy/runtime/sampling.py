"""Sampling parameters (vLLM's names) and the device-side sampler of the engine's steps."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """temperature 0 means greedy. top_k 0 or -1 / top_p 1.0 disable those filters (vLLM's
    conventions; -1 is stored as 0). ``stop``: strings that end the output (not included in it;
    needs a tokenizer), a str or a list of them. Every field is checked here, with a one-line
    ValueError."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a non-empty str or a list of them, got {self.stop!r}")
        self.stop = list(self.stop)
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= 1, or 0 / -1 for off, got {self.top_k!r}")
        self.top_k = max(self.top_k, 0)
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1] (1 = off), got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -2**63 <= self.seed < 2**63):
            raise ValueError(f"seed must be an int in [-2**63, 2**63) or None, got {self.seed!r}")
        if _is_int(self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of token ids, got the int {self.stop_token_ids}; "
                             f"write [{self.stop_token_ids}]")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be a list of non-negative int token ids, "
                             f"got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., vocab] -> the distribution tokens are drawn from (temperature > 0): softmax at
    the temperature, restricted to the top-k and the top-p nucleus, renormalised. float32."""
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        drop = torch.cumsum(sorted_probs, -1) - sorted_probs >= params.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token from a distribution [vocab]."""
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 ``x`` (values in [0, 2**32)); multipliers below 2**31 keep
    every product inside int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] float32 uniforms in (0, 1), a pure function of (seed, counter, vocab index): a
    request's draws do not depend on which other requests share its steps, nor on the device."""
    key = _mix32(seeds & _M32) ^ _mix32(((seeds >> 32) & _M32) ^ 0x9E3779B9)
    key = _mix32(key ^ _mix32(counters & _M32))
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.long)
    bits = _mix32(key[:, None] ^ _mix32(ids ^ 0x85EBCA6B)[None, :]) >> 8  # 24 bits
    return (bits.float() + 0.5) * (1.0 / (1 << 24))


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], counters: list[int],
                to_device=None) -> torch.Tensor:
    """The next token of each row of ``logits`` [rows, vocab], on the logits' device: the argmax for
    greedy rows; for sampled rows a Gumbel-max draw from ``target_probs`` (temperature, top-k,
    top-p), keyed by the row's request seed and the token's index (``counters``) so it is
    reproducible and independent of batching. ``to_device``: moves a host list of ints to the
    device without a sync (``GraphRunner.to_device``)."""
    greedy = logits.argmax(-1)
    if all(p.temperature == 0 for p in params):
        return greedy
    dev = to_device or (lambda v: torch.tensor(v, dtype=torch.long, device=logits.device))
    vocab = logits.shape[-1]
    # per-row parameters in one int64 transfer: temperature and top_p as float32 bit patterns
    floats = torch.tensor([[p.temperature or 1.0 for p in params], [p.top_p for p in params]], dtype=torch.float32)
    packed = dev([*floats.view(torch.int32).flatten().tolist(), *[p.top_k or vocab for p in params], *seeds, *counters])
    n = len(params)
    temperature, top_p = packed[:2 * n].to(torch.int32).view(torch.float32).view(2, n)
    top_k, seed, counter = packed[2 * n:].view(3, n)
    scaled = logits.float() / temperature[:, None]
    if any(p.top_k or p.top_p < 1.0 for p in params if p.temperature > 0):
        values, order = scaled.sort(-1, descending=True)
        keep = torch.arange(vocab, device=logits.device)[None, :] < top_k[:, None]
        probs = torch.softmax(values.masked_fill(~keep, float("-inf")), -1)
        keep &= torch.cumsum(probs, -1) - probs < top_p[:, None]  # target_probs' nucleus rule
        values = values.masked_fill(~keep, float("-inf"))
    else:
        values, order = scaled, None
    noise = uniform_noise(seed, counter, vocab)
    gumbel = -torch.log(-torch.log(noise))
    if order is not None:
        gumbel = gumbel.gather(-1, order)
    pick = (values + gumbel).argmax(-1)
    sampled = order.gather(-1, pick[:, None])[:, 0] if order is not None else pick
    is_greedy = torch.tensor([p.temperature == 0 for p in params])
    if is_greedy.any():
        return torch.where(dev(is_greedy.long().tolist()).bool(), greedy, sampled)
    return sampled
