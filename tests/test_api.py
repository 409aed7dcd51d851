"""LLM.generate against transformers on every zoo model, plus the API's errors."""

import pytest
import torch

from autodeploy import LLM, DeployConfig, SamplingParams
from autodeploy.api import _eos_token_ids
from autodeploy.cache_spec import POOL_FULL
from autodeploy.models import build_model, zoo_names
from helpers import hf_generate, hf_greedy_uncached

PROMPT_LENS = [1, 5, 30, 70, 100, 13]  # several longer than every zoo sliding window (<= 24)
NEW_TOKENS = 32


def prompts(vocab, lens=PROMPT_LENS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("name", zoo_names())
def test_greedy_tokens_equal_transformers(name):
    """6 prompts decoded concurrently (4 lanes, 40-token budget: multi-chunk prefills mixed with
    decodes). Oracle: transformers greedy decoding by uncached forwards, always; and transformers'
    generate() wherever generate() agrees with its own uncached forward. (transformers 5.23's cached
    generate() departs from its uncached forward for some prompts: NemotronH and Bamba at prompt
    lengths such as 64/90/100/128, first-token logits off by up to 0.2; Gemma2 once past its window.)"""
    model = build_model(name)
    llm = LLM(model, max_batch_size=4, max_seq_len=256, max_num_tokens=40, page_size=8)
    ps = prompts(model.config.vocab_size)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    assert llm.engine.num_steps > NEW_TOKENS  # chunked: more steps than tokens
    agree_with_generate = 0
    for p, out in zip(ps, outs):
        tokens = out.outputs[0].token_ids
        assert out.prompt_token_ids == p and out.outputs[0].finish_reason == "length"
        assert tokens == hf_greedy_uncached(model, p, NEW_TOKENS)
        reference = hf_generate(model, p, NEW_TOKENS)
        if reference == hf_greedy_uncached(model, p, NEW_TOKENS):
            assert tokens == reference
            agree_with_generate += 1
    assert agree_with_generate >= 4
    llm.engine.pools.assert_empty()


@pytest.fixture(scope="module")
def llm():
    return LLM(build_model("gemma3"), max_batch_size=3, max_seq_len=128, max_num_tokens=24, page_size=8)


def test_arrivals_and_aborts_do_not_change_other_requests(llm):
    ps = prompts(256, [40, 7, 60, 3], seed=1)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    alone = [llm.generate([{"prompt_token_ids": p}], params)[0].outputs[0].token_ids for p in ps]
    engine = llm.engine
    a = engine.add_request(ps[0], params)
    b = engine.add_request(ps[1], params)
    for _ in range(4):
        engine.step()
    c = engine.add_request(ps[2], params)  # arrives mid-run
    doomed = engine.add_request(ps[3], params)
    for _ in range(3):
        engine.step()
    engine.abort(doomed)  # aborted mid-run
    while engine.has_unfinished():
        engine.step()
    assert [engine.requests[i].output for i in (a, b, c)] == [alone[0], alone[1], alone[2]]
    assert engine.requests[doomed].finish_reason == "abort"
    engine.pools.assert_empty()
    for i in (a, b, c, doomed):
        engine.requests.pop(i)


def test_stop_tokens_and_sampling_seed(llm):
    p = prompts(256, [9], seed=2)[0]
    greedy = llm.generate([{"prompt_token_ids": p}], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    stop = greedy.outputs[0].token_ids[3]
    params = SamplingParams(max_tokens=10, stop_token_ids=[stop], ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": p}], params)[0]
    first = greedy.outputs[0].token_ids.index(stop)
    assert out.outputs[0].token_ids == greedy.outputs[0].token_ids[: first + 1]
    assert out.outputs[0].finish_reason == "stop"
    sp = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)
    a = llm.generate([{"prompt_token_ids": p}], sp)[0].outputs[0].token_ids
    b = llm.generate([{"prompt_token_ids": p}], sp)[0].outputs[0].token_ids
    assert a == b and len(a) == 12


@pytest.mark.parametrize("prompt,params,match", [
    ([], SamplingParams(), "empty prompt"),
    ([1, 2, 999], SamplingParams(), "out of range"),
    ([1, -1], SamplingParams(), "out of range"),
    ([1] * 100, SamplingParams(max_tokens=40), "exceeds max_seq_len 128"),
])
def test_bad_requests_are_rejected_at_submission(llm, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([{"prompt_token_ids": prompt}], params)
    assert not llm.engine.has_unfinished()
    llm.engine.pools.assert_empty()


def test_request_larger_than_the_pool():
    small = LLM(build_model("llama"), max_batch_size=2, max_seq_len=128, page_size=8, num_pages=4)
    with pytest.raises(ValueError, match="needs 5 KV pages, the whole pool has 4"):
        small.generate([{"prompt_token_ids": [1] * 30}], SamplingParams(max_tokens=10))


def test_pool_pressure_makes_requests_wait():
    model = build_model("llama")
    tight = LLM(model, max_batch_size=4, max_seq_len=64, page_size=8, num_pages=6)
    ps = prompts(256, [20, 20, 20], seed=3)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    outs = tight.generate([{"prompt_token_ids": p} for p in ps], params)  # 4 pages each: one at a time
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == hf_greedy_uncached(model, p, 8)
    tight.engine.pools.assert_empty()


def test_bad_config_and_prompts():
    with pytest.raises(TypeError, match=r"unknown LLM option\(s\) \['max_batch'\]"):
        LLM(build_model("llama"), max_batch=4)
    with pytest.raises(ValueError, match="page_size must be a positive int"):
        DeployConfig(page_size=0)
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM("/nonexistent/model/dir")


def test_prompt_ids_as_tensors_and_wrong_shapes_or_types(llm):
    ids = torch.tensor([5, 6, 7])
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    assert (llm.generate([{"prompt_token_ids": ids}], params)[0].outputs[0].token_ids
            == llm.generate([{"prompt_token_ids": [5, 6, 7]}], params)[0].outputs[0].token_ids)
    with pytest.raises(ValueError, match="must be 1-D"):
        llm.generate([{"prompt_token_ids": ids[None]}], params)
    with pytest.raises(ValueError, match="not int"):
        llm.generate([{"prompt_token_ids": [1.5, 2]}], params)
    with pytest.raises(TypeError, match="a prompt is a str, "):
        llm.generate([[1, 2, 3]], params)
    llm.engine.pools.assert_empty()


def test_string_prompt_without_tokenizer(llm):
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        llm.generate("hello")
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        llm.generate({"prompt": "hello"})
    with pytest.raises(ValueError, match="chat needs a tokenizer"):
        llm.chat([{"role": "user", "content": "hello"}])


def test_cache_budget_sizes_the_full_attention_pool():
    """max_cache_bytes pays the fixed caches (SSM/conv state, window rings) first; the rest becomes
    full-attention pages. Too small a budget is an error that says what took the memory."""
    model = build_model("hybrid")
    roomy = LLM(model, max_batch_size=2, max_seq_len=64, page_size=8, max_num_tokens=16, num_pages=10)
    per_page = roomy.cache_bytes()[POOL_FULL] // 11  # 10 pages + the null page
    fixed = sum(b for pool, b in roomy.cache_bytes().items() if pool != POOL_FULL)
    budget = fixed + 7 * per_page + per_page // 2  # 6 usable pages + the null page, half a page spare
    sized = LLM(model, max_batch_size=2, max_seq_len=64, page_size=8, max_num_tokens=16, max_cache_bytes=budget)
    assert sized.engine.sizes.num_full_pages == 6
    assert sum(sized.cache_bytes().values()) <= budget
    with pytest.raises(ValueError, match="leaves no full-attention page"):
        LLM(model, max_batch_size=2, max_seq_len=64, page_size=8, max_num_tokens=16, max_cache_bytes=fixed + per_page)
    with pytest.raises(ValueError, match="num_pages or max_cache_bytes, not both"):
        DeployConfig(num_pages=4, max_cache_bytes=1 << 20)


def test_stream_yields_growing_snapshots_and_early_exit_aborts(llm):
    ps = prompts(256, [12, 30], seed=4)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    final = llm.generate([{"prompt_token_ids": p} for p in ps], params)
    seen: dict[int, list[list[int]]] = {0: [], 1: []}
    for out in llm.stream([{"prompt_token_ids": p} for p in ps], params):
        seen[out.prompt_index].append(out.outputs[0].token_ids)
        assert out.finished == (len(out.outputs[0].token_ids) == 6)
    for i in (0, 1):
        assert [len(t) for t in seen[i]] == [1, 2, 3, 4, 5, 6]  # one snapshot per new token
        assert seen[i][-1] == final[i].outputs[0].token_ids
    stream = llm.stream([{"prompt_token_ids": p} for p in ps], params)
    next(stream)
    stream.close()  # the caller stops listening: both requests are aborted, their caches freed
    assert not llm.engine.has_unfinished() and not llm.engine.requests
    llm.engine.pools.assert_empty()


def test_every_eos_id_of_the_generation_config_stops(llm):
    """Models such as Llama 3 name several end-of-sequence ids; any of them ends a request."""
    p = prompts(256, [9], seed=2)[0]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    tokens = llm.generate([{"prompt_token_ids": p}], params)[0].outputs[0].token_ids
    gen_config = llm.model.generation_config
    saved = (gen_config.eos_token_id, llm.engine.eos_token_ids)
    try:
        gen_config.eos_token_id = [254 if tokens[4] == 255 else 255, tokens[4]]
        llm.engine.eos_token_ids = frozenset(_eos_token_ids(llm.model))
        assert llm.engine.eos_token_ids == set(gen_config.eos_token_id)
        out = llm.generate([{"prompt_token_ids": p}], SamplingParams(max_tokens=10))[0].outputs[0]
    finally:
        gen_config.eos_token_id, llm.engine.eos_token_ids = saved
    assert out.token_ids == tokens[: tokens.index(tokens[4]) + 1] and out.finish_reason == "stop"


def test_checkpoint_directory_missing_weights(tmp_path):
    build_model("llama").config.save_pretrained(tmp_path)  # config.json, no weights
    with pytest.raises(FileNotFoundError, match="cannot load the checkpoint"):
        LLM(str(tmp_path))


def test_checkpoint_directory_round_trip(tmp_path):
    model = build_model("llama")
    model.save_pretrained(tmp_path)
    out = LLM(str(tmp_path), max_batch_size=1, max_seq_len=32, max_num_tokens=16).generate(
        [{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy_uncached(model, [1, 2, 3], 4)
