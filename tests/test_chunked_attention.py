"""Block-local ("chunked") causal attention, end to end: read off the mask by match_attention,
routed from Llama 4's layer types, served from rings bounded by the chunk, exact under
speculation, on the torch and Triton backends; refused by flashinfer.

Oracles: the models' own uncached forwards (transformers' Llama 4 and the hand-written module) and
transformers' generate(); greedy tokens compared exactly, float32."""

import pytest
import torch

from autodeploy import LLM, SamplingParams
from autodeploy.export import ExportError, export_model
from autodeploy.fx_utils import op_kwargs, op_nodes
from autodeploy.models.reference import greedy_generate, greedy_uncached
from autodeploy.transforms import run_pipeline
from handwritten import TinyLM, greedy, logits, prompts
from helpers import ATTENTION

ENGINE = dict(max_batch_size=4, max_seq_len=64, max_num_tokens=16, page_size=4)
NEW = 8


def llama4(chunk: int = 8, floor_scale: int = 8192, seed: int = 0):
    """Llama 4's text model, tiny: three block-local RoPE layers (chunk C) and one global NoPE layer,
    dense MLPs (its MoE layers do not export with a dynamic token count yet)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Llama4TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_chunk_size=chunk, moe_layers=[],
        max_position_embeddings=256, floor_scale=floor_scale)
    assert config.layer_types == ["chunked_attention"] * 3 + ["full_attention"]
    torch.manual_seed(seed)
    return transformers.Llama4ForCausalLM(config).eval()


def _served(llm, model, oracle, lens=(3, 11, 20, 29)):
    ps = [p for p in prompts(lens)]
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], SamplingParams(max_tokens=NEW, ignore_eos=True))
    got = [o.outputs[0].token_ids for o in outs]
    assert got == [oracle(model, p, NEW) for p in ps]
    llm.engine.pools.assert_empty()
    return got


@pytest.mark.parametrize("chunk", [8, 5])
def test_hand_written_chunked_mask_is_matched_and_served_exactly(chunk):
    model = TinyLM(mask="chunked", chunk=chunk).eval()
    gm = export_model(model, max_seq_len=64)
    (info,) = run_pipeline(gm, ["match_attention"], {"match_attention": {"unmatched": "error"}})
    assert [op_kwargs(n)["attention_chunk"] for n in op_nodes(gm, ATTENTION)] == [chunk, chunk]
    ids = prompts([29])[0]
    torch.testing.assert_close(gm(torch.tensor([ids]), torch.arange(29)[None])[0], logits(model, ids),
                               rtol=0, atol=1e-5)
    llm = LLM(model, **ENGINE)
    assert set(llm.cache_bytes()) == {f"kv_chunk_{chunk}"}
    _served(llm, model, greedy)


def test_llama4_text_layers_served_exactly():
    """Tokens equal to transformers' uncached forward and to its generate() (4 prompts of 3..29
    tokens on 4 lanes, prefills in chunks of 16 tokens across chunk boundaries)."""
    model = llama4()
    llm = LLM(model, **ENGINE)
    cached = op_nodes(llm.gm, torch.ops.autodeploy.torch_cached_attention.default)
    chunked = [op_kwargs(n)["attention_chunk"] for n in cached]
    assert chunked == [8, 8, 8, 0]
    got = _served(llm, model, greedy_uncached)
    ps = prompts((3, 11, 20, 29))
    assert got == [greedy_generate(model, p, NEW) for p in ps]


def test_llama4_chunked_mask_read_by_the_matcher():
    """Exported with transformers' own SDPA (no routing): match_attention reads the block-local mask
    transformers builds (create_chunked_causal_mask)."""
    model = llama4()
    model.config._attn_implementation = "sdpa"
    gm = export_model(model, max_seq_len=64, route_attention=False)
    run_pipeline(gm, ["match_attention"], {"match_attention": {"unmatched": "error"}})
    nodes = op_nodes(gm, ATTENTION)
    assert [op_kwargs(n)["attention_chunk"] for n in nodes] == [8, 8, 8, 0]
    ids = prompts([41])[0]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids]), use_cache=False).logits
    torch.testing.assert_close(gm(torch.tensor([ids]), torch.arange(41)[None]), ref, rtol=0, atol=2e-5)


def test_chunk_rings_are_bounded_by_the_chunk_not_the_sequence():
    model = TinyLM(mask="chunked").eval()
    small = LLM(model, **{**ENGINE, "max_seq_len": 64}).cache_bytes()
    large = LLM(model, **{**ENGINE, "max_seq_len": 256}).cache_bytes()
    assert small == large  # per-slot rings of ceil((8 + 16) / 4) + 1 pages
    slots, ring_pages, page, heads, head_dim, layers = 5, 7, 4, 4, 8, 2
    assert large["kv_chunk_8"] == 2 * layers * slots * ring_pages * page * heads * head_dim * 4


@pytest.mark.parametrize("spec", [{"method": "ngram", "num_speculative_tokens": 3},
                                  {"method": "draft_model", "num_speculative_tokens": 3}])
def test_chunked_attention_exact_under_speculation(spec):
    model = TinyLM(mask="chunked").eval()
    if spec["method"] == "draft_model":
        spec = {**spec, "model": TinyLM(mask="chunked", seed=0, layers=1).eval()}
    ps = prompts((5, 20, 29)) + [[7, 8, 9, 10] * 5]  # a repetition for the n-gram drafter to find
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    plain = LLM(model, **ENGINE).generate([{"prompt_token_ids": p} for p in ps], params)
    llm = LLM(model, speculative_config=spec, **ENGINE)
    got = llm.generate([{"prompt_token_ids": p} for p in ps], SamplingParams(max_tokens=12, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in plain]
    assert llm.spec_stats.num_verify_steps > 0


def test_triton_backend_gives_the_torch_backend_tokens():
    pytest.importorskip("triton")
    model = llama4(seed=1)
    options = dict(max_batch_size=2, max_seq_len=64, max_num_tokens=16, page_size=4)
    ps = [{"prompt_token_ids": p} for p in prompts((4, 29), seed=1)]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    ref = LLM(model, attn_backend="torch", **options).generate(ps, params)
    llm = LLM(model, attn_backend="triton", **options)
    llm.engine.runner.poison = True  # unowned ring rows are NaN: never read
    got = llm.generate(ps, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]


def test_flashinfer_refuses_chunked_layers():
    gm = export_model(TinyLM(mask="chunked").eval(), max_seq_len=64)
    with pytest.raises(ValueError, match=r"flashinfer backend has no block-local \(chunked\) attention.*'triton'"):
        run_pipeline(gm, ["match_attention", "insert_cached_attention"],
                     {"insert_cached_attention": {"backend": "flashinfer"}})


def test_llama4_position_temperature_refused_where_it_would_matter():
    """Llama 4's NoPE layers scale queries by a temperature computed from arange(seq_len), which
    changes from position floor_scale - 1: served below it, refused at or past it."""
    model = llama4(floor_scale=16)
    with pytest.raises(ExportError, match=r"layers\.3\.self_attn .*arange\(seq_len\).*max_seq_len <= 15"):
        LLM(model, **ENGINE)
    llm = LLM(model, **{**ENGINE, "max_seq_len": 15})
    ps = prompts((3, 6))
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], SamplingParams(max_tokens=6, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == [greedy_uncached(model, p, 6) for p in ps]


def test_torch_compile_backend_lowers_block_local_attention_to_sdpa():
    """The uncached torch.compile backend lowers a matched chunked op to SDPA with the block mask."""
    from autodeploy.custom_ops.attention import attention_reference
    from autodeploy.dynamo_backend import sdpa_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, h, 8, generator=g) for n, h in ((7, 4), (19, 2), (19, 2)))
    for chunk in (1, 5, 19):
        torch.testing.assert_close(sdpa_attention(q, k, v, 0.3, 0, 0.0, None, chunk),
                                   attention_reference(q, k, v, 0.3, 0, 0.0, None, chunk), rtol=0, atol=1e-5)
