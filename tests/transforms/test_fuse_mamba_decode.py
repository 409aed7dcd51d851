"""fuse_mamba_decode: which Mamba2 chains become ``autodeploy::triton_cached_mamba_mixer``, and the
engine's outputs with it against the unfused graph and the torch backend (the oracle).

The Triton kernels run in Triton's interpreter on the CPU (tests/conftest.py), so the models are
the zoo's tiny ones and runs are short.
"""

import collections

import pytest
import torch

from autodeploy import LLM, SamplingParams
from autodeploy.models import build_model
from autodeploy.runtime.batch import LaneInput

pytest.importorskip("triton")

OPTIONS = dict(max_batch_size=2, max_seq_len=64, page_size=8, attn_backend="torch")


def autodeploy_ops(gm) -> collections.Counter:
    return collections.Counter(n.target._schema.name.removeprefix("autodeploy::") for n in gm.graph.nodes
                               if n.op == "call_function" and hasattr(n.target, "_schema")
                               and n.target._schema.name.startswith("autodeploy::"))


def test_mixers_fused_ops_counted_logits_equal_unfused():
    """mamba2 (two mixers): each conv -> split -> scan -> cast -> gated norm chain becomes one fused op
    (no cached conv, scan or gated norm left, one counters node); the step logits (a chunked
    prefill, a decode step with a new one-token sequence) equal the unfused Triton graph's."""
    model = build_model("mamba2")
    fused = LLM(model, ssm_backend="triton", max_num_tokens=8, **OPTIONS)
    plain = LLM(model, ssm_backend="triton", max_num_tokens=8, perf_transforms={"fuse_mamba_decode": False},
                **OPTIONS)
    ops, before = autodeploy_ops(fused.gm), autodeploy_ops(plain.gm)
    assert before["triton_cached_ssd_scan"] == before["triton_cached_causal_conv1d"] == 2
    assert ops["triton_cached_mamba_mixer"] == 2 and ops["mamba_mixer_counters"] == 1
    assert not ops["triton_cached_ssd_scan"] and not ops["triton_cached_causal_conv1d"]
    assert ops["rms_norm"] == before["rms_norm"] - 2  # the gated norms; the block norms stay
    info = next(i for i in fused.transform_infos if i.name == "fuse_mamba_decode")
    assert info.num_matches == 2 and info.details["unfused"] == 0
    steps = [[LaneInput(list(range(3, 10)), 0, 1, [1])],
             [LaneInput([4], 7, 1, [1]), LaneInput([9], 0, 2, [2])]]
    for lanes in steps:
        got, want = fused.engine.runner.run(lanes), plain.engine.runner.run(lanes)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_torch_backend_is_left_alone():
    llm = LLM(build_model("mamba2"), ssm_backend="torch", max_num_tokens=8, **OPTIONS)
    ops = autodeploy_ops(llm.gm)
    assert not ops["triton_cached_mamba_mixer"] and ops["torch_cached_ssd_scan"] == 2


def _tokens(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


# ~30-50 s each in the interpreter: NemotronH's and Bamba's mixers (the hybrid's is NemotronH's) run opt-in
@pytest.mark.parametrize("name", ["hybrid", "mamba2", pytest.param("nemotron_h", marks=pytest.mark.slow),
                                  pytest.param("bamba", marks=pytest.mark.slow)])
def test_greedy_tokens_equal_the_torch_backend_chunked_and_poisoned(name):
    """Chunked prefill (chunks of 8: multi-token lanes in the fused kernel) and decode steps,
    every step poisoned (NaN in every unowned slot and intermediate buffer): the torch backend's
    greedy tokens, float32."""
    model = build_model(name)
    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (11, 2)]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    ref = _tokens(LLM(model, ssm_backend="torch", max_num_tokens=8, **OPTIONS), ps, params)
    llm = LLM(model, ssm_backend="triton", max_num_tokens=8, **OPTIONS)
    assert autodeploy_ops(llm.gm)["triton_cached_mamba_mixer"] >= 1
    llm.engine.runner.poison = True
    assert _tokens(llm, ps, params) == ref


def test_hybrid_long_chunk_and_ngram_speculation_poisoned():
    """A prefill chunk past the fused kernel's lane limit (the existing kernels' lanes, in a step
    that also runs fused lanes), then n-gram speculation (verify lanes and replays through the
    existing kernels, decode lanes fused), poisoned: the torch backend's tokens. (Accepted drafts,
    whose replays also run through the existing kernels, are tests/test_backends.py's draft-model
    run, which now goes through the fused op too.)"""
    from autodeploy.custom_ops import triton_ssd_scan

    model = build_model("hybrid")
    g = torch.Generator().manual_seed(6)  # a seed whose tokens repeat earlier ones: the drafter proposes drafts
    ps = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (36, 2)]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    options = dict(OPTIONS, max_num_tokens=40, speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    ref = _tokens(LLM(model, ssm_backend="torch", **options), ps, params)
    llm = LLM(model, ssm_backend="triton", **options)
    llm.engine.runner.poison = True
    assert len(ps[0]) >= triton_ssd_scan.CHUNKED_MIN_TOKENS
    assert _tokens(llm, ps, params) == ref
    assert llm.spec_stats.num_draft_tokens > 0
