"""Prefix caching: tokens with caching equal tokens without it (float32, greedy), on every model
family of the zoo, over multi-turn chats whose turns reuse everything up to the previous answer's
last token, under page and snapshot pool pressure, with aborts, speculative decoding, poisoned
steps and checked mode; and the page pool's reference counts and LRU order."""

import functools
import random

import pytest

from autodeploy import LLM, SamplingParams
from autodeploy.models import build_model
from autodeploy.runtime.pools import POOL_SNAPSHOTS, snapshot_bytes
from autodeploy.runtime.prefix_cache import PagePool, page_digests

OPTIONS = dict(max_batch_size=3, max_seq_len=112, max_num_tokens=16, page_size=8, self_check=False)
CACHING = dict(enable_prefix_caching=True, prefix_snapshot_interval=16, checked=True)


@functools.cache
def model(name: str):
    return build_model(name)


@functools.cache
def plain(name: str) -> LLM:
    return LLM(model(name), **OPTIONS)


def tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outs], [o.num_cached_tokens for o in outs]


def chat(llm: LLM, reference: LLM, turns: int = 3, conversations: int = 4, max_tokens: int = 6, seed: int = 0):
    """Conversations sharing a 20-token system prompt, each turn the previous prompt + answer + a
    new message; asserts every turn's tokens equal ``reference``'s. Returns the cached counts and
    the prompt lengths per turn."""
    g = random.Random(seed)
    system = [g.randrange(256) for _ in range(20)]
    convs = [system + [g.randrange(256) for _ in range(g.randint(1, 10))] for _ in range(conversations)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    cached, lengths = [], []
    for _ in range(turns):
        want, _ = tokens(reference, convs, params)
        got, hits = tokens(llm, convs, params)
        assert got == want
        cached.append(hits)
        lengths.append([len(c) for c in convs])
        convs = [c + out + [g.randrange(256) for _ in range(3)] for c, out in zip(convs, got)]
        llm.engine.pools.assert_empty()
        llm.engine.check_accounting()
    return cached, lengths


@pytest.mark.parametrize("name", ["llama", "gemma3", "mistral", "hybrid", "mamba2", "nemotron_h"])
def test_multi_turn_chat_reuses_up_to_the_last_answer_token_exactly(name):
    """Full attention, sliding windows (gemma3 mixes them, mistral is all window), Mamba2 and the
    hybrid of all three: tokens equal the engine without caching; a later turn reuses the whole
    previous turn (prompt + answer, all but the answer's last token, which was never fed); the
    first turn's other conversations reuse the system prompt up to a page (full attention) or a
    snapshot boundary (per-slot state)."""
    llm = LLM(model(name), **OPTIONS, **CACHING)
    cached, lengths = chat(llm, plain(name))
    assert cached[0][0] == 0 and all(c == 16 for c in cached[0][1:])
    for turn in (1, 2):
        assert cached[turn] == [n + 6 - 1 for n in lengths[turn - 1]]
    stats = llm.engine.prefix.stats
    assert stats.num_cached_tokens == sum(map(sum, cached)) and 0 < stats.hit_rate < 1


def test_reuse_is_off_without_the_option():
    _, cached = tokens(plain("llama"), [[1, 2, 3] * 10] * 2, SamplingParams(max_tokens=2))
    assert cached == [0, 0] and plain("llama").engine.prefix is None


@pytest.mark.parametrize("name", ["llama", "hybrid"])
def test_page_pool_pressure_evicts_lru_pages_and_stays_exact(name):
    """Fewer pages than the cached prefixes need: cached pages are evicted (LRU) to admit new
    requests; tokens stay exact and nothing is shared that was evicted."""
    llm = LLM(model(name), **OPTIONS, **CACHING, num_pages=20)
    chat(llm, plain(name), turns=3, conversations=5)
    assert llm.engine.pools.pages.num_evicted > 0


def test_snapshot_pool_pressure_evicts_lru_snapshots_and_stays_exact():
    llm = LLM(model("hybrid"), **OPTIONS, **CACHING, prefix_snapshots=2)
    cached, _ = chat(llm, plain("hybrid"), turns=3, conversations=4)
    snaps = llm.engine.pools.snapshots
    assert snaps.num_evicted > 0 and len(snaps) == 2
    assert any(cached[2])  # the latest snapshots still hit


def test_aborted_requests_leave_exact_prefixes():
    """Requests aborted mid-prefill and mid-decode: what they leave behind (keyed pages, a
    snapshot of their exact end when every token is known) serves later requests exactly."""
    llm = LLM(model("hybrid"), **OPTIONS, **CACHING)
    g = random.Random(3)
    base = [g.randrange(256) for _ in range(40)]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    eng = llm.engine
    for stop_after in (1, 2, 4, 6):
        rid = eng.add_request(base + [stop_after], params)
        for _ in range(stop_after):
            eng.step()
        eng.abort(rid)
        eng.requests.pop(rid)
    while eng.has_unfinished():
        eng.step()
    prompts = [base + [1], base + [4, 9], base[:30]]
    want, _ = tokens(plain("hybrid"), prompts, params)
    got, cached = tokens(llm, prompts, params)
    assert got == want and all(cached)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculative_decoding_with_prefix_caching_is_exact(method):
    """Verify steps leave the SSM state before their tokens (the accepted ones are replayed by the
    next step): the end snapshot is taken there, never after rejected drafts. Tokens equal the
    engine without speculation and without caching."""
    spec = {"method": method, "num_speculative_tokens": 3}
    if method == "draft_model":
        spec["model"] = build_model("hybrid")  # the same weights: every draft is accepted
    llm = LLM(model("hybrid"), **OPTIONS, **CACHING, speculative_config=spec)
    g = random.Random(5)
    loop = [g.randrange(256) for _ in range(5)] * 4  # repetition: the n-gram drafter's drafts get accepted
    prompts = [loop + [g.randrange(256) for _ in range(n)] for n in (2, 5, 9)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    for _ in range(2):
        want, _ = tokens(plain("hybrid"), prompts, params)
        got, cached = tokens(llm, prompts, params)
        assert got == want
        prompts = [p + out + [7] for p, out in zip(prompts, got)]
    assert all(cached) and llm.spec_stats.num_accepted_tokens > 0


def test_poisoned_steps_with_cached_prefixes_give_the_same_tokens():
    """Everything a step must not read is garbage (unkept pages, rows past each lane's cached
    length, unowned slots, free snapshot rows): restored prefixes read only what was kept."""
    llm = LLM(model("hybrid"), **OPTIONS, **CACHING)
    llm.engine.runner.poison = True
    cached, _ = chat(llm, plain("hybrid"), turns=2)
    assert any(cached[1])


def test_cache_bytes_report_the_snapshot_pool():
    llm = LLM(model("hybrid"), **OPTIONS, **CACHING, prefix_snapshots=5)
    specs = list(llm.record.caches)
    assert llm.cache_bytes()[POOL_SNAPSHOTS] == snapshot_bytes(specs, llm.engine.sizes) > 0
    assert POOL_SNAPSHOTS not in plain("hybrid").cache_bytes()


def test_page_pool_reference_counts_and_lru_order():
    pool = PagePool(4)
    a = pool.allocate(2)
    keys = page_digests(list(range(16)), 8)
    for page, key in zip(a, keys):
        pool.register(page, key)
    assert pool.match(keys) == a and pool.match(page_digests([9] * 16, 8)) == []
    pool.share(a[:1])
    pool.free(a)  # a[0] still held once, a[1] cached
    assert pool.used == {a[0]} and pool.resident == set(a) and pool.num_free == 3
    pool.free(a[:1])
    assert not pool.check([])
    fresh = pool.allocate(2)  # never-used pages first: nothing evicted yet
    assert pool.num_evicted == 0 and set(fresh).isdisjoint(a)
    assert pool.allocate(1) == [a[1]]  # then the least recently freed cached page
    assert pool.num_evicted == 1 and pool.match(keys) == [a[0]]
    with pytest.raises(RuntimeError, match="not allocated"):
        pool.free([a[0]])


def test_digests_chain_the_whole_prefix():
    one, two = page_digests([1, 2, 3, 4], 2), page_digests([5, 6, 3, 4], 2)
    assert one[1] != two[1] and len(one) == 2 and page_digests([1, 2, 3], 2) == one[:1]


def test_metrics_and_graph_summary_show_the_prefix_cache():
    """/metrics reads the hit counters and the snapshot pool from the engine; ``autodeploy graph``'s
    summary sizes the snapshot pool."""
    import types

    from autodeploy.graph_view import summarize
    from autodeploy.server.metrics import ServerMetrics

    llm = LLM(model("hybrid"), **OPTIONS, **CACHING, prefix_snapshots=5)
    _, cached = tokens(llm, [[3] * 30, [3] * 30 + [4]], SamplingParams(max_tokens=2, ignore_eos=True))
    text = ServerMetrics(types.SimpleNamespace(engine=llm.engine, alive=True)).render().decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["autodeploy_prefix_cache_hits_total"] == sum(cached) > 0
    assert values["autodeploy_prefix_cache_queries_total"] == 61
    assert values["autodeploy_prefix_cache_hit_rate"] == pytest.approx(sum(cached) / 61)
    assert values["autodeploy_prefix_snapshots_used"] == len(llm.engine.pools.snapshots) > 0
    assert "prefix_snapshots" in summarize(llm) and "5 prefix-cache snapshots" in summarize(llm)


def test_tensor_parallel_ranks_reuse_prefixes_exactly(tmp_path):
    """2 CPU ranks (gloo) with prefix caching: every rank makes the same cache decisions (the
    schedule and the keys are the same), and a second chat turn's tokens equal the unsharded
    engine's without caching."""
    import json
    import subprocess
    import sys

    import tp_worker
    from test_tensor_parallel import ROOT, _env

    out = tmp_path / "ranks.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(ROOT / "tests" / "tp_worker.py"), str(out), "hybrid", "--prefix-caching"],
        env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(out.read_text())["hybrid/eager"]
    reference = LLM(model("hybrid"), tensor_parallel_size=1, self_check=False, **tp_worker.ENGINE)
    params = SamplingParams(max_tokens=tp_worker.NEW_TOKENS, ignore_eos=True)
    first, _ = tokens(reference, tp_worker.prompts(), params)
    second, _ = tokens(reference, [p + o + [7] for p, o in zip(tp_worker.prompts(), first)], params)
    for rank in ranks:
        assert rank["greedy"] == first and rank["next_turn"] == second
        assert rank["next_turn_cached"] == [len(p) + tp_worker.NEW_TOKENS - 1 for p in tp_worker.prompts()]


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["llama", "gemma3", "hybrid", "mamba2"])
def test_cuda_graphs_with_prefix_caching_give_eager_tokens(name):
    """Triton kernels under CUDA graphs, float32, poisoned replays: snapshot copies and restores
    run on the stream between replays; tokens equal the eager engine without caching."""
    gpu = dict(OPTIONS, device="cuda", dtype="float32", attn_backend="triton", ssm_backend="triton",
               max_cache_bytes=2**28)  # two engines alive: the GPU default would give the first 90 % of it
    reference = LLM(model(name), **gpu, compile_mode="eager")
    llm = LLM(model(name), **gpu, **CACHING, compile_mode="cudagraph")
    llm.engine.runner.poison = True
    cached, _ = chat(llm, reference, turns=3)
    assert llm.engine.runner.num_replays > 0 and any(cached[2])


def test_default_snapshot_pool_takes_at_most_a_quarter_of_a_cache_budget():
    import dataclasses

    specs = list(plain("hybrid").record.caches)
    each = snapshot_bytes(specs, dataclasses.replace(plain("hybrid").engine.sizes, num_snapshots=1))
    llm = LLM(model("hybrid"), **OPTIONS, enable_prefix_caching=True, max_cache_bytes=20 * each)
    assert llm.engine.sizes.num_snapshots == 5 and llm.cache_bytes()[POOL_SNAPSHOTS] == 5 * each
    assert sum(llm.cache_bytes().values()) <= 20 * each


def test_seeded_sampling_with_prefix_caching_gives_the_same_tokens():
    """The device sampler keys its random numbers by seed and token index, not by the step: a
    request that skips its cached prefix draws the same tokens."""
    llm = LLM(model("hybrid"), **OPTIONS, **CACHING)
    g = random.Random(9)
    shared = [g.randrange(256) for _ in range(34)]
    prompts = [shared + [1, 2], shared + [3]]
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=123, ignore_eos=True)
    want, _ = tokens(plain("hybrid"), prompts, params)
    tokens(llm, [shared + [5]], params)
    got, cached = tokens(llm, prompts, params)
    assert got == want and cached == [32, 32]
