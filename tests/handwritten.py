"""Small hand-written causal LMs (plain PyTorch, no transformers classes), as a new user writes
them: the models the build must serve exactly or refuse. Seeded weights, float32.

``TinyLM(mask=..., positions=..., returns=..., signature=...)``:
  mask: "causal" (SDPA is_causal), "bool_window" / "additive_window" (sliding window W via an
        explicit mask), "eager" (matmul/softmax with a masked_fill causal mask), "chunked" (block-local
        causal: query i sees keys of its own block of C, Llama 4's local layers), "bidirectional"
        (no mask at all: every token sees every other).
  positions: "rope" (from position_ids), "learned" (an embedding of position_ids), "arange" (RoPE
        from arange(seq_len) computed inside: position_ids ignored).
  returns: "tensor", "tuple" ((logits, hidden)), "dict" ({"logits": ..., "hidden": ...}).
  signature: "kwargs" (forward(input_ids, position_ids=None, **kwargs)), "plain"
        (forward(input_ids, position_ids): no use_cache accepted).
  mixer: None, or a token-mixing op after attention that no cache holds: "cumsum" (a running mean
        over the tokens so far: causal, but state a cached engine loses between steps) or
        "seqmean" (subtracts the mean over the whole sequence: bidirectional).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 97


def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [b, h, s, d], pos [b, s] -> x rotated (half-split RoPE, base 10000)."""
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos[:, None, :, None].float() * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return (x * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


class TokenMixer(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "cumsum":
            count = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
            return x + torch.cumsum(x, 1) / count
        return x - x.mean(1, keepdim=True)


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, mask: str, window: int, chunk: int, mixer: str | None = None):
        super().__init__()
        self.mix = TokenMixer(mixer) if mixer else None
        self.heads, self.mask, self.window, self.chunk = heads, mask, window, chunk
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def attend(self, q, k, v):
        s = q.shape[2]
        i = torch.arange(s, device=q.device)[:, None]
        j = torch.arange(s, device=q.device)[None, :]
        if self.mask == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.mask == "bidirectional":
            return F.scaled_dot_product_attention(q, k, v)
        if self.mask == "bool_window":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - self.window))
        if self.mask == "additive_window":
            keep = (j <= i) & (j > i - self.window)
            bias = torch.zeros(s, s, device=q.device).masked_fill(~keep, float("-inf"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if self.mask == "chunked":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i // self.chunk == j // self.chunk))
        if self.mask == "eager":
            w = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
            w = w.masked_fill(~(j <= i), float("-inf"))
            return torch.softmax(w, -1) @ v
        raise ValueError(self.mask)

    def forward(self, x, pos):
        b, s, hdim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, hdim // self.heads).permute(2, 0, 3, 1, 4)
        if pos is not None:
            q, k = rope(q, pos), rope(k, pos)
        a = self.attend(q, k, v).transpose(1, 2).reshape(b, s, hdim)
        x = x + self.out(a)
        if self.mix is not None:
            x = self.mix(x)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, mask: str = "causal", positions: str = "rope", returns: str = "tensor",
                 signature: str = "kwargs", layers: int = 2, hidden: int = 32, heads: int = 4,
                 window: int = 6, chunk: int = 8, mixer: str | None = None, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.positions, self.returns = positions, returns
        self.embed = nn.Embedding(VOCAB, hidden)
        self.pos_embed = nn.Embedding(512, hidden) if positions == "learned" else None
        self.blocks = nn.ModuleList(Block(hidden, heads, mask, window, chunk, mixer) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, VOCAB, bias=False)
        with torch.no_grad():  # larger logits: greedy ties impossible, wrong context shows at once
            self.head.weight.mul_(8.0)
        if signature == "plain":
            self.forward = self.forward_plain

    def body(self, input_ids, position_ids):
        if self.positions == "arange" or position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        x = self.embed(input_ids)
        rope_pos = position_ids
        if self.pos_embed is not None:
            x, rope_pos = x + self.pos_embed(position_ids), None
        for block in self.blocks:
            x = block(x, rope_pos)
        logits = self.head(self.norm(x))
        if self.returns == "tuple":
            return logits, x
        if self.returns == "dict":
            return {"logits": logits, "hidden": x}
        return logits

    def forward(self, input_ids, position_ids=None, **kwargs):
        return self.body(input_ids, position_ids)

    def forward_plain(self, input_ids, position_ids):
        return self.body(input_ids, position_ids)


def logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """The model's own uncached forward over the whole sequence: [len(ids), vocab]."""
    t = torch.tensor([ids])
    with torch.no_grad():
        out = model(t, torch.arange(len(ids))[None])
    if isinstance(out, tuple):
        out = out[0]
    elif isinstance(out, dict):
        out = out["logits"]
    return out[0]


def greedy(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full uncached forwards of the model itself (the oracle)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(logits(model, ids)[-1].argmax()))
    return ids[len(prompt):]


def prompts(lens=(3, 11, 20, 29), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lens]
