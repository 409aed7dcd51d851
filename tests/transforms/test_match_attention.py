"""match_attention on hand-written modules and on transformers models exported without routing."""

import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autodeploy import export_model
from autodeploy.fx_utils import op_kwargs, op_nodes
from autodeploy.models import build_model
from autodeploy.transforms import run_pipeline
from autodeploy.transforms.match_attention import UncacheableAttention, describe_mask
from helpers import ATTENTION, LEFTOVER_ATTENTION, attention_layers, expected_windows, hf_logits, op_counts

ATOL = 2e-5  # float32, reordered reductions only


class ToyAttention(nn.Module):
    """A plain module computing causal attention in one of several idioms."""

    def __init__(self, style: str, window: int = 0, kv_heads: int = 4, soft_cap: float = 0.0):
        super().__init__()
        self.style, self.window, self.kv_heads, self.soft_cap = style, window, kv_heads, soft_cap
        self.embed = nn.Embedding(32, 32)
        self.q = nn.Linear(32, 32)
        self.kv = nn.Linear(32, 2 * kv_heads * 8)
        self.out = nn.Linear(32, 32)
        self.register_buffer("tril", torch.ones(256, 256).tril().bool(), persistent=False)

    def keep(self, L):
        keep = self.tril[:L, :L]
        if self.window:
            keep = keep & ~self.tril[:L, :L].tril(-self.window)
        return keep

    def forward(self, input_ids, position_ids, use_cache=False):
        x = self.embed(input_ids)
        L = x.shape[1]
        q = self.q(x).view(1, L, 4, 8).transpose(1, 2)
        k, v = self.kv(x).view(1, L, 2, self.kv_heads, 8).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if self.kv_heads != 4:
            k = k.repeat_interleave(4 // self.kv_heads, dim=1)
            v = v.repeat_interleave(4 // self.kv_heads, dim=1)
        if self.style == "sdpa_causal":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.style == "sdpa_bool_mask":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.keep(L))
        elif self.style == "sdpa_no_mask":  # bidirectional: must not be matched
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            w = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(8)
            if self.soft_cap:
                w = torch.tanh(w / self.soft_cap) * self.soft_cap
            if self.style == "eager_masked_fill":
                w = w.masked_fill(~self.keep(L), float("-inf"))
            elif self.style == "eager_additive":
                w = w + torch.zeros(L, L).masked_fill(~self.keep(L), torch.finfo(torch.float32).min)
            elif self.style == "eager_alibi":  # a bias, not a mask: must not be matched
                w = w + torch.arange(L)[None, :].float() * 0.1
            p = torch.softmax(w.float(), dim=-1).to(q.dtype)
            o = F.dropout(p, 0.1, training=False) @ v
        return self.out(o.transpose(1, 2).reshape(1, L, 32))


MATCHED = [
    ("sdpa_causal", 0, 4, 0.0), ("sdpa_bool_mask", 0, 4, 0.0), ("sdpa_bool_mask", 5, 2, 0.0),
    ("eager_masked_fill", 0, 4, 0.0), ("eager_masked_fill", 6, 1, 3.0), ("eager_additive", 4, 2, 0.0),
    ("eager_additive", 0, 4, 2.0),
]


@pytest.mark.parametrize("style,window,kv_heads,soft_cap", MATCHED)
def test_hand_written_attention_is_matched(style, window, kv_heads, soft_cap):
    torch.manual_seed(0)
    model = ToyAttention(style, window, kv_heads, soft_cap).eval()
    gm = export_model(model, max_seq_len=64)
    (info,) = run_pipeline(gm, ["match_attention"])
    assert info.num_matches == 1 and info.details["unmatched"] == []
    counts = op_counts(gm)
    assert counts[ATTENTION] == 1 and not any(counts[t] for t in LEFTOVER_ATTENTION)
    assert counts[torch.ops.aten.repeat_interleave.self_int] == 0  # GQA is expressed by head ratio
    (node,) = op_nodes(gm, ATTENTION)
    kw = op_kwargs(node)
    assert kw["sliding_window"] == window and kw["soft_cap"] == soft_cap
    assert math.isclose(kw["scale"], 8 ** -0.5, rel_tol=1e-6)
    assert node.args[1].meta["val"].shape[2] == kv_heads
    for length in (5, 23):
        ids = torch.randint(0, 32, (1, length))
        pos = torch.arange(length)[None]
        with torch.no_grad():
            torch.testing.assert_close(gm(ids, pos), model(ids, pos), atol=ATOL, rtol=0)


@pytest.mark.parametrize("style", ["sdpa_no_mask", "eager_alibi"])
def test_unmatchable_attention_runs_unchanged_with_a_warning(style, caplog):
    torch.manual_seed(0)
    model = ToyAttention(style).eval()
    gm = export_model(model, max_seq_len=64)
    with caplog.at_level(logging.WARNING, logger="autodeploy.transforms"):
        (info,) = run_pipeline(gm, ["match_attention"])
    assert info.num_matches == 0 and len(info.details["unmatched"]) == 1
    assert any("left unmatched" in r.message and "<root>" in r.message for r in caplog.records)
    ids, pos = torch.randint(0, 32, (1, 9)), torch.arange(9)[None]
    with torch.no_grad():
        torch.testing.assert_close(gm(ids, pos), model(ids, pos))


@pytest.mark.parametrize("name,impl", [
    ("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"), ("gemma2", "eager"), ("gemma3", "sdpa"),
    ("gemma3", "eager"), ("nemotron_h", "sdpa"), ("bamba", "eager"),
])
def test_transformers_attention_is_matched_from_the_graph(name, impl):
    """Exported without routing the attention interface, the FX matcher alone finds every layer."""
    model = build_model(name)
    model.config._attn_implementation = impl
    gm = export_model(model, max_seq_len=128, route_attention=False)
    assert op_counts(gm)[ATTENTION] == 0
    (info,) = run_pipeline(gm, ["match_attention"])
    assert info.num_matches == attention_layers(model)
    counts = op_counts(gm)
    assert counts[ATTENTION] == attention_layers(model)
    assert not any(counts[t] for t in LEFTOVER_ATTENTION)
    nodes = op_nodes(gm, ATTENTION)
    assert [op_kwargs(n)["sliding_window"] for n in nodes] == expected_windows(model)
    cap = getattr(model.config, "attn_logit_softcapping", None) or 0.0
    assert all(op_kwargs(n)["soft_cap"] == cap for n in nodes)
    for length in (6, 41):
        ids, pos, ref = hf_logits(model, length, seed=length)
        with torch.no_grad():
            torch.testing.assert_close(gm(ids, pos), ref, atol=ATOL, rtol=0)


def test_routed_export_leaves_nothing_to_match():
    gm = export_model(build_model("gemma2"), max_seq_len=64)
    (info,) = run_pipeline(gm, ["match_attention"])
    assert info.num_matches == 0 and not info.changed and info.details["unmatched"] == []


@pytest.mark.parametrize("style, pattern", [
    ("sdpa_no_mask", "bidirectional, every query sees every key"),
    ("eager_alibi", "mask has shape \\(1, 64\\)"),
])
def test_unmatchable_attention_is_an_error_for_a_cached_engine(style, pattern):
    """unmatched="error" (what the cached engine asks for): the layer and the pattern are named."""
    torch.manual_seed(0)
    gm = export_model(ToyAttention(style).eval(), max_seq_len=64)
    with pytest.raises(UncacheableAttention, match=rf"<root> \(\w+\): .*{pattern}.*torch.compile"):
        run_pipeline(gm, ["match_attention"], {"match_attention": {"unmatched": "error"}})


class RouterSoftmax(nn.Module):
    """A mixture-of-experts style router: a softmax over experts, not attention."""

    def __init__(self):
        super().__init__()
        self.embed, self.router, self.head = nn.Embedding(32, 16), nn.Linear(16, 4), nn.Linear(16, 32)

    def forward(self, input_ids, position_ids):
        x = self.embed(input_ids)
        weights = torch.softmax(self.router(x), dim=-1)
        return self.head(x * weights.sum(-1, keepdim=True) + weights.max(-1, keepdim=True).values)


def test_a_softmax_that_is_not_attention_is_no_error():
    gm = export_model(RouterSoftmax().eval(), max_seq_len=16)
    (info,) = run_pipeline(gm, ["match_attention"], {"match_attention": {"unmatched": "error"}})
    assert info.num_matches == 0 and all(line.endswith("(not attention)") for line in info.details["unmatched"])


def test_describe_mask_names_where_it_departs_from_causal():
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    assert describe_mask((j <= i) & (i // 4 == j // 4)) == "query 4 sees keys 4"
    assert describe_mask(torch.ones(10, 10, dtype=torch.bool)) == "query 0 sees later keys (keys 0..9): not causal"
    assert describe_mask((j <= i) & (j != 1)) == "query 1 sees keys 0"
    assert describe_mask((j <= i) & ((j != 1) | (i < 3))) == "query 3 sees keys 0, 2..3"
