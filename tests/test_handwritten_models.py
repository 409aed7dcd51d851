"""Hand-written PyTorch causal LMs (tests/handwritten.py), served as a new user would: each is
served with exactly the tokens of its own uncached forward, or refused at build with an error
that names the layer. Oracle: greedy decoding by full forwards of the model itself, float32."""

import pytest
import torch

from autodeploy import LLM, SamplingParams
from autodeploy.export import ExportError, export_model
from autodeploy.transforms.match_attention import UncacheableAttention
from handwritten import TinyLM, greedy, logits, prompts

ENGINE = dict(max_batch_size=4, max_seq_len=64, max_num_tokens=16, page_size=4)  # 29-token prompts: 2 chunks
NEW = 8

SERVED = {
    "sdpa_causal_rope": {},
    "bool_window": {"mask": "bool_window"},
    "additive_window": {"mask": "additive_window"},
    "eager_softmax": {"mask": "eager"},
    "learned_positions": {"positions": "learned"},
    "forward_without_kwargs": {"signature": "plain"},
    "returns_tuple": {"returns": "tuple"},
    "returns_dict": {"returns": "dict"},
}


def _served_exactly(model, **engine):
    llm = LLM(model, **{**ENGINE, **engine})
    ps = prompts()
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], SamplingParams(max_tokens=NEW))
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == greedy(model, p, NEW), f"prompt of {len(p)} tokens"
    llm.engine.pools.assert_empty()
    return llm


@pytest.mark.parametrize("name", SERVED)
def test_served_with_exact_tokens(name):
    _served_exactly(TinyLM(**SERVED[name]).eval())


@pytest.mark.parametrize("returns", ["tensor", "tuple", "dict"])
def test_export_reads_logits_of_any_return_convention(returns):
    model = TinyLM(returns=returns, signature="plain").eval()
    gm = export_model(model, max_seq_len=64)
    ids = prompts([13])[0]
    got = gm(torch.tensor([ids]), torch.arange(13)[None])[0]
    torch.testing.assert_close(got, logits(model, ids), rtol=0, atol=1e-5)


class _NoLogits(torch.nn.Module):
    def __init__(self, returns):
        super().__init__()
        self.embed, self.returns = torch.nn.Embedding(10, 4), returns

    def forward(self, input_ids, position_ids):
        x = self.embed(input_ids)
        return {"hidden": x} if self.returns == "dict" else (x[0] if self.returns == "2d" else str(x.shape))


class _NeedsMask(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)

    def forward(self, input_ids, attention_mask):
        return self.embed(input_ids)


@pytest.mark.parametrize("model, match", [
    (_NoLogits("dict"), r"returned a dict without 'logits' \(keys \['hidden'\]\)"),
    (_NoLogits("2d"), r"returned logits of shape \(\w+, 4\); expected \[1, s, vocab\]"),
    (_NoLogits("str"), "returned str holding str; it must return the logits"),
    (_NeedsMask(), r"_NeedsMask.forward requires \['attention_mask'\], which autodeploy cannot supply"),
])
def test_other_calling_conventions_are_one_clear_error(model, match):
    with pytest.raises(ExportError, match=match):
        export_model(model, max_seq_len=16)


def test_bidirectional_attention_is_refused_at_build():
    """Left as exported, such a layer sees only the current step's tokens (and, batched, the other
    requests' tokens): wrong tokens. The cached engine refuses it, naming each layer and the mask."""
    with pytest.raises(UncacheableAttention, match=r"blocks\.0 \(scaled_dot_product_attention\): .*bidirectional"
                                                   r".*blocks\.1 .*torch\.compile"):
        LLM(TinyLM(mask="bidirectional").eval(), **ENGINE)


@pytest.mark.parametrize("name", ["bool_window", "returns_dict"])
def test_exact_under_ngram_and_draft_model_speculation(name):
    model = TinyLM(**SERVED[name]).eval()
    draft = TinyLM(**SERVED[name], layers=1).eval()  # same embedding and first block: right often, not always
    for spec in ({"method": "ngram", "num_speculative_tokens": 3},
                 {"method": "draft_model", "model": draft, "num_speculative_tokens": 3}):
        llm = _served_exactly(model, speculative_config=spec)
        assert llm.spec_stats.num_verify_steps > 0
