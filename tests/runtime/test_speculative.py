"""Speculative decoding: exact tokens, exact committed SSM/conv state, acceptance statistics."""

import copy

import pytest
import torch

from autodeploy import LLM, SamplingParams
from autodeploy.cache_spec import POOL_REPLAY
from autodeploy.models import build_model
from autodeploy.runtime.speculative import Draft, Drafter, NgramDrafter, SpecDecodingStats, accept

GREEDY = SamplingParams(max_tokens=20, ignore_eos=True)
SIZES = dict(max_batch_size=3, max_seq_len=160, max_num_tokens=24, page_size=8)


def prompts(lens, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def perturbed(model, scale=0.15, seed=1):
    """The same model with noisy weights: a draft that agrees with the target only sometimes."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().nan_to_num(0.0))
    return draft


def run(model, ps, params=GREEDY, **options):
    llm = LLM(model, **SIZES, **options)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], params)
    llm.engine.pools.assert_empty()
    if hasattr(llm.drafter, "runner"):
        llm.drafter.runner.pools.assert_empty()
    return llm, [o.outputs[0].token_ids for o in outs]


# 5 prompts on 3 lanes with a 24-token budget: prefill chunks share steps with verify steps
PROMPTS = prompts([5, 40, 17, 60, 9])
PROMPTS[2] = [7, 8, 9, 10] * 4 + [7]  # repetition for the n-gram drafter to find


@pytest.mark.parametrize("name", ["nemotron_h", "bamba", "mamba2", "gemma3", "hybrid"])
def test_speculation_gives_exactly_the_tokens_of_plain_greedy(name):
    model = build_model(name)
    _, plain = run(model, PROMPTS)
    ngram, with_ngram = run(model, PROMPTS, speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    draft, with_draft = run(model, PROMPTS, speculative_config={
        "method": "draft_model", "model": perturbed(model), "num_speculative_tokens": 4})
    assert with_ngram == plain and with_draft == plain
    for llm in (ngram, draft):
        assert llm.spec_stats.num_verify_steps > 0
    # the noisy draft is right often but not always: verify steps both accept and reject
    assert 0 < draft.spec_stats.num_accepted_tokens < draft.spec_stats.num_draft_tokens


def test_a_hybrid_target_with_a_pure_mamba_draft():
    model = build_model("hybrid")
    _, plain = run(model, PROMPTS[:3])
    llm, got = run(model, PROMPTS[:3], speculative_config={
        "method": "draft_model", "model": build_model("mamba2"), "num_speculative_tokens": 2})
    assert got == plain
    assert any(pool.startswith("draft:") for pool in llm.cache_bytes())


class ForcedDrafter(Drafter):
    """Proposes the true continuation with a wrong token at a chosen index, cycling the number of
    correct drafts through 0..K, so every accepted count occurs."""

    def __init__(self, truth: list[int], k: int):
        self.truth, self.max_draft_tokens, self.calls = truth, k, 0

    def propose(self, requests, num_tokens):
        out = []
        for req, k in zip(requests, num_tokens):
            start = len(req.tokens)
            tokens = self.truth[start:start + k]
            correct = self.calls % (self.max_draft_tokens + 1)
            if correct < len(tokens):
                tokens[correct] = (tokens[correct] + 1) % 256
            self.calls += 1
            out.append(Draft(tokens))
        return out


def slot_states(engine, slot):
    return {spec.name: engine.pools.tensors[spec.name][slot].clone()
            for spec in engine.pools.specs if spec.pool in ("ssm", "conv")}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_every_accepted_count_leaves_the_committed_state_of_plain_decoding(k):
    """After a verify step the state cache holds the state of plain decoding at the lane's
    committed length (the verify tokens did not advance it; the previous step's accepted tokens
    were replayed onto it). Compares SSM and conv state tensors, not only tokens."""
    model = build_model("hybrid")
    prompt = prompts([11], seed=3)[0]
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    plain = LLM(model, **SIZES)
    rid = plain.engine.add_request(prompt, params)
    req = plain.engine.requests[rid]
    states = {}
    while not req.finished:
        plain.engine.step()
        if not req.finished:
            states[req.num_cached] = slot_states(plain.engine, req.slot)
    truth = prompt + req.output

    spec = LLM(model, **SIZES, speculative_config={"method": "ngram", "num_speculative_tokens": k})
    spec.engine.drafter = ForcedDrafter(truth, k)
    rid = spec.engine.add_request(prompt, params)
    req = spec.engine.requests[rid]
    seen, checked = set(), 0
    while not req.finished:
        committed_before = req.num_cached
        verifies_before = req.spec.num_verify_steps
        spec.engine.step()
        if req.spec.num_verify_steps > verifies_before:
            seen.add(req.accepted - 1)
            if not req.finished:
                for name, state in slot_states(spec.engine, req.slot).items():
                    torch.testing.assert_close(state, states[committed_before][name], atol=1e-4, rtol=1e-4,
                                               msg=lambda m: f"{name} at {committed_before}: {m}")
                checked += 1
    assert prompt + req.output == truth
    assert seen == set(range(k + 1)) and checked >= k


def test_replay_buffers_are_far_smaller_than_state_copies():
    for name in ("nemotron_h", "bamba", "mamba2", "hybrid"):
        k = 4
        llm = LLM(build_model(name), **SIZES, speculative_config={"method": "ngram", "num_speculative_tokens": k})
        pools = llm.cache_bytes()
        state_per_slot = pools["ssm"] + pools["conv"]
        assert POOL_REPLAY in pools
        assert pools[POOL_REPLAY] * 4 < (1 + k) * state_per_slot, (name, pools)


def test_ngram_lookup():
    drafter = NgramDrafter(3, prompt_lookup_min=1, prompt_lookup_max=3)
    assert drafter.lookup([1, 2, 3, 9, 1, 2, 3, 4, 1, 2, 3], 3) == [4, 1, 2]  # latest 3-gram match
    assert drafter.lookup([5, 6, 7, 5], 2) == [6, 7]  # falls back to a 1-gram
    assert drafter.lookup([1, 2, 3], 2) == []
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        NgramDrafter(3, prompt_lookup_min=3, prompt_lookup_max=2)


@pytest.mark.parametrize("spec,match", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "method 'medusa' unknown"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an int"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, r"keys \['model'\] unknown"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
])
def test_bad_speculative_config(spec, match):
    from autodeploy import DeployConfig

    with pytest.raises(ValueError, match=match):
        DeployConfig(speculative_config=spec)


def test_speculative_sampling_preserves_the_target_distribution():
    """Vocabulary of 6, fixed target rows p0, p1, p2 and draft distributions q; 20000 verify
    steps with K = 2. The first committed token must follow p0, the second (when there is one)
    p1: total variation below 0.02 (sampling noise is about 0.006). The draft's own distribution
    is far from p (TV > 0.2), so a rule that kept drafts blindly would fail."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, generator=g) * 1.5
    q = torch.softmax(torch.randn(2, 6, generator=g) * 1.5, -1)
    params = SamplingParams(temperature=1.0)
    p = torch.softmax(logits, -1)
    assert 0.5 * (p[:2] - q).abs().sum(-1).min() > 0.2
    for probs in (q, None):  # a sampled draft (draft model) and a chosen one (n-gram: q one-hot)
        first, second = torch.zeros(6), torch.zeros(6)
        for _ in range(20000):
            if probs is None:
                tokens = [int(torch.randint(0, 6, (), generator=g)) for _ in range(2)]
            else:
                tokens = [int(torch.multinomial(probs[i], 1, generator=g)) for i in range(2)]
            n, bonus = accept(logits, Draft(tokens, probs), params, g)
            committed = tokens[:n] + [bonus]
            first[committed[0]] += 1
            if len(committed) > 1:
                second[committed[1]] += 1
        assert 0.5 * (first / first.sum() - p[0]).abs().sum() < 0.02
        assert 0.5 * (second / second.sum() - p[1]).abs().sum() < 0.02


def test_sampling_with_speculation_runs_and_is_reproducible():
    model = build_model("hybrid")
    params = SamplingParams(temperature=0.8, top_k=50, seed=3, max_tokens=16, ignore_eos=True)
    spec = {"method": "draft_model", "model": perturbed(model), "num_speculative_tokens": 3}
    llm, a = run(model, PROMPTS[:2], params, speculative_config=spec)
    _, b = run(model, PROMPTS[:2], params, speculative_config=spec)
    assert a == b and all(len(t) == 16 for t in a)
    assert llm.spec_stats.num_verify_steps > 0


def test_stats():
    s = SpecDecodingStats(num_verify_steps=4, num_draft_tokens=12, num_accepted_tokens=6)
    assert s.acceptance_rate == 0.5 and s.mean_accepted_length == 2.5
