"""insert_cached_attention: graph shape, and logits of a two-chunk prefill equal the uncached graph."""

import torch

from autodeploy import export_model
from autodeploy.cache_spec import POOL_FULL, swa_pool
from autodeploy.fx_utils import op_nodes, placeholder_names
from autodeploy.graph_record import graph_record
from autodeploy.models import build_model
from autodeploy.runtime.batch import BatchInputs, LaneInput
from autodeploy.runtime.pools import CachePools, PoolSizes
from autodeploy.transforms import run_pipeline
from helpers import ATTENTION, op_counts

CACHED = torch.ops.autodeploy.torch_cached_attention.default
PREPARE = torch.ops.autodeploy.prepare_attention_metadata.default


def test_gemma3_gets_two_pools_and_one_prepare_node_per_pool():
    model = build_model("gemma3")
    gm = export_model(model, max_seq_len=128)
    uncached = export_model(model, max_seq_len=128)
    infos = run_pipeline(gm, ["match_attention", "insert_cached_attention"],
                         {"insert_cached_attention": {"page_size": 8, "max_num_tokens": 32}})
    assert infos[1].num_matches == 6 and infos[1].details["prepare_nodes"] == 2
    counts = op_counts(gm)
    assert counts[CACHED] == 6 and counts[ATTENTION] == 0 and counts[PREPARE] == 2
    specs = graph_record(gm).caches
    assert sorted({s.pool for s in specs}) == [POOL_FULL, swa_pool(16)]
    # every cached op reads metadata that a prepare node in this graph wrote
    for node in op_nodes(gm, CACHED):
        metas = node.args[5:10]
        assert all(m.args[0].target == PREPARE for m in metas)

    # run one 30-token prompt as two chunks (17 + 13) through the cached graph
    sizes = PoolSizes(max_batch_size=2, max_seq_len=128, page_size=8, max_num_tokens=32, num_full_pages=16)
    pools = CachePools(specs, sizes)
    batch = BatchInputs(2, 32, sizes.max_pages_per_seq)
    names = placeholder_names(gm)
    ids = torch.randint(0, 256, (30,)).tolist()
    pages = pools.pages.allocate(4)
    outs = []
    for start, end in ((0, 17), (17, 30)):
        args = batch.fill([LaneInput(ids[start:end], start, 1, pages)])
        args.update(pools.tensors)
        with torch.no_grad():
            outs.append(gm(*[args[n] for n in names]))
    with torch.no_grad():
        ref = uncached(torch.tensor([ids]), torch.arange(30)[None])
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=2e-5, rtol=0)


def test_swa_pool_does_not_grow_with_max_seq_len():
    model = build_model("mistral")  # every layer has window 24
    bytes_at = {}
    for max_seq_len in (128, 1024):
        gm = export_model(model, max_seq_len=max_seq_len)
        run_pipeline(gm, ["match_attention", "insert_cached_attention"],
                     {"insert_cached_attention": {"page_size": 8, "max_num_tokens": 32}})
        sizes = PoolSizes(2, max_seq_len, 8, 32)
        bytes_at[max_seq_len] = CachePools(list(graph_record(gm).caches), sizes).bytes_by_pool()
    assert set(bytes_at[128]) == {swa_pool(24)}
    assert bytes_at[128] == bytes_at[1024]


def test_a_window_that_never_binds_shares_the_full_pool():
    """Mistral's window (24) with max_seq_len 32 and a 16-token budget: a ring (5 pages of 8)
    would be larger than a full-length page list (4 pages), so the layer uses the full pool and
    keeps its window argument; tokens equal transformers."""
    from autodeploy import LLM, SamplingParams
    from helpers import hf_greedy_uncached

    model = build_model("mistral")
    llm = LLM(model, max_batch_size=2, max_seq_len=32, max_num_tokens=16, page_size=8)
    assert set(llm.cache_bytes()) == {"kv_full"}
    assert {n.args[-3] for n in op_nodes(llm.gm, CACHED)} == {24}
    prompt = list(range(3, 23))
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=12, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy_uncached(model, prompt, 12)


def test_ring_pools_take_their_size_from_the_graph():
    """A sliding-window pool holds the ring the graph's prepare node addresses (recorded on its
    CacheSpec), whatever token budget the pools are given."""
    from autodeploy.custom_ops.prepare_metadata import swa_ring_pages

    gm = export_model(build_model("mistral"), max_seq_len=128)  # every layer has window 24
    run_pipeline(gm, ["match_attention", "insert_cached_attention"],
                 {"insert_cached_attention": {"page_size": 8, "max_num_tokens": 32}})
    specs = graph_record(gm).caches
    ring = swa_ring_pages(24, 32, 8)
    assert {s.ring_pages for s in specs} == {ring}
    assert {n.args[-1] for n in op_nodes(gm, PREPARE)} == {ring}
    pools = CachePools(specs, PoolSizes(2, 128, 8, 16))  # another budget: the graph's ring all the same
    assert {tuple(t.shape[:2]) for t in pools.tensors.values()} == {(3 * ring, 8)}
