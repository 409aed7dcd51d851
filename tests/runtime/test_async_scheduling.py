"""Async scheduling: each step's tokens are chosen on the device and fed to the next step there;
the host reads them one step late. Tokens, stop handling, aborts and pools must be exactly those
of synchronous steps (the tokens of each request are also what it gets alone: tests/test_fuzz.py),
and the device sampler must draw from ``target_probs`` independently of the batch."""

import random

import pytest
import torch

from autodeploy import LLM, SamplingParams
from autodeploy.models import build_model
from autodeploy.runtime.sampling import sample_rows, target_probs

OPTIONS = dict(max_batch_size=3, max_seq_len=112, max_num_tokens=16, page_size=8)


@pytest.fixture(scope="module")
def llm():
    return LLM(build_model("hybrid"), **OPTIONS)


def _prompts(n, seed=0):
    g = random.Random(seed)
    return [[g.randrange(256) for _ in range(g.randint(1, 40))] for _ in range(n)]


def _serve(engine, prompts, params):
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while engine.has_unfinished():
        engine.step()
    engine.pools.assert_empty()
    outs = [engine.requests.pop(i) for i in ids]
    return [(r.output, r.finish_reason) for r in outs]


def test_async_steps_give_the_tokens_of_synchronous_steps(llm):
    """Five requests over three lanes (admissions while others decode), max_tokens 1..20, a stop
    token in two of them: outputs and finish reasons equal, nothing emitted past a stop."""
    prompts = _prompts(5)
    greedy = [SamplingParams(max_tokens=t, ignore_eos=True) for t in (7, 12, 1, 20, 3)]
    llm.engine.async_scheduling = False
    sync = _serve(llm.engine, prompts, greedy)
    stops = [SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=[sync[1][0][4]]),
             SamplingParams(max_tokens=20, ignore_eos=True, stop_token_ids=[sync[3][0][0]])]
    params = [greedy[0], stops[0], greedy[2], stops[1], greedy[4]]
    sync = _serve(llm.engine, prompts, params)
    llm.engine.async_scheduling = True
    steps = llm.engine.num_steps
    assert _serve(llm.engine, prompts, params) == sync
    assert llm.engine.num_steps > steps
    assert sync[1] == (sync[1][0][:5], "stop") and sync[3] == (sync[3][0][:1], "stop")


def test_an_abort_while_a_step_is_in_flight_frees_everything(llm):
    engine = llm.engine
    engine.async_scheduling = True
    prompts = _prompts(2, seed=1)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    alone = _serve(engine, prompts[1:], [params])[0]
    a, b = (engine.add_request(p, params) for p in prompts)
    for _ in range(3):
        engine.step()
    assert engine._inflight is not None  # the last step's tokens are still on their way
    engine.abort(a)
    while engine.has_unfinished():
        engine.step()
    engine.pools.assert_empty()
    assert engine.requests.pop(a).finish_reason == "abort"
    assert (engine.requests.pop(b).output, "length") == alone


def test_sampled_tokens_do_not_depend_on_the_batch(llm):
    """A seeded sampled request gives the same tokens alone, beside others, and synchronously."""
    prompts = _prompts(3, seed=2)
    sp = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=11, max_tokens=12, ignore_eos=True)
    others = [SamplingParams(max_tokens=5), SamplingParams(temperature=1.0, seed=3, max_tokens=8)]
    llm.engine.async_scheduling = True
    alone = _serve(llm.engine, prompts[:1], [sp])[0]
    batched = _serve(llm.engine, prompts, [sp, *others])[0]
    llm.engine.async_scheduling = False
    sync = _serve(llm.engine, prompts, [sp, *others])[0]
    llm.engine.async_scheduling = True
    assert alone == batched == sync and len(alone[0]) == 12


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3),
                                    SamplingParams(temperature=1.3, top_p=0.6)])
def test_device_sampler_draws_from_target_probs(params):
    """20000 draws (one row per token index) of a fixed 6-token distribution: total variation to
    ``target_probs`` below 0.02 (sampling noise ~0.006); a greedy row beside them stays the argmax."""
    logits = torch.randn(6, generator=torch.Generator().manual_seed(0)) * 1.5
    n = 20000
    rows = logits.expand(n + 1, 6).clone()
    greedy = SamplingParams()
    tokens = sample_rows(rows, [params] * n + [greedy], [5] * (n + 1), list(range(n + 1)))
    counts = torch.bincount(tokens[:n], minlength=6).float() / n
    tv = 0.5 * (counts - target_probs(logits, params)).abs().sum()
    assert tv < 0.02, tv
    assert tokens[n] == logits.argmax()
    again = sample_rows(rows[:3], [params] * 3, [5] * 3, [0, 1, 2])  # the same (seed, index): the same token
    assert again.tolist() == tokens[:3].tolist()
