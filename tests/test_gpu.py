"""GPU checks (``pytest -m gpu``): every fast backend against the torch backend on the same GPU.

Model level, float32: greedy tokens of the Triton backends equal the torch backend's for every
zoo model, with and without speculative decoding (replay included). bfloat16: the Triton
backends' prefill logits stay within 5e-2 x max|logit| of the torch backend in float32. The op
level checks live in tests/custom_ops/test_triton_*.py, which run on CUDA when it is there.
"""

import pytest
import torch

from autodeploy import LLM, SamplingParams
from autodeploy.models import build_model, zoo_names
from autodeploy.runtime.batch import LaneInput

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

OPTIONS = dict(max_batch_size=4, max_seq_len=256, max_num_tokens=64, page_size=16, device="cuda")


def prompts(vocab, lens=(1, 17, 45, 120), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, vocab, (n,), generator=g).tolist()} for n in lens]


def tokens(llm, ps, params):
    return [o.outputs[0].token_ids for o in llm.generate(ps, params)]


@pytest.mark.parametrize("name", zoo_names())
def test_triton_backends_give_torch_backend_tokens(name):
    model = build_model(name)
    ps, params = prompts(model.config.vocab_size), SamplingParams(max_tokens=24, ignore_eos=True)
    ref = tokens(LLM(model, attn_backend="torch", ssm_backend="torch", **OPTIONS), ps, params)
    fast = LLM(model, attn_backend="triton", ssm_backend="triton", **OPTIONS)
    assert tokens(fast, ps, params) == ref
    spec = LLM(model, attn_backend="triton", ssm_backend="triton", **OPTIONS,
               speculative_config={"method": "draft_model", "model": build_model(name), "num_speculative_tokens": 3})
    assert tokens(spec, ps, params) == ref
    assert spec.spec_stats.num_accepted_tokens > 0


@pytest.mark.parametrize("name", ["hybrid", "nemotron_h", "gemma2"])
def test_bfloat16_prefill_logits_near_float32_torch(name):
    model = build_model(name)
    ids = prompts(model.config.vocab_size, lens=(50,))[0]["prompt_token_ids"]
    lane = LaneInput(ids, 0, 1, list(range(1, 5)))
    ref = LLM(model, attn_backend="torch", ssm_backend="torch", **OPTIONS).engine.runner.run([lane]).float()
    fast = LLM(build_model(name), attn_backend="triton", ssm_backend="triton", dtype="bfloat16", **OPTIONS)
    got = fast.engine.runner.run([lane]).float()
    assert (got - ref).abs().max() <= 5e-2 * ref.abs().max()


@pytest.mark.parametrize("name", zoo_names())
def test_cuda_graphs_give_eager_tokens(name):
    """Captured decode/verify graphs (padded to the next captured size) and inductor + CUDA graphs
    give the eager engine's tokens, with and without draft-model speculation (replay in the graph)."""
    model = build_model(name)
    ps, params = prompts(model.config.vocab_size), SamplingParams(max_tokens=24, ignore_eos=True)
    fast = dict(attn_backend="triton", ssm_backend="triton", **OPTIONS)
    ref = tokens(LLM(model, **fast), ps, params)
    graphed = LLM(model, compile_mode="cudagraph", **fast)
    assert tokens(graphed, ps, params) == ref
    assert graphed.engine.runner.num_replays > 0
    spec = {"method": "draft_model", "model": build_model(name), "num_speculative_tokens": 3}
    graphed_spec = LLM(model, compile_mode="cudagraph", speculative_config=spec, **fast)
    assert tokens(graphed_spec, ps, params) == ref
    assert graphed_spec.spec_stats.num_accepted_tokens > 0 and graphed_spec.engine.runner.num_replays > 0
    assert tokens(LLM(model, compile_mode="inductor+cudagraph", **fast), ps, params) == ref


def test_cuda_graph_replays_are_immune_to_poison():
    """Before every replay the captured graphs' private memory pool (all their intermediates:
    every derived metadata buffer) and every unowned cache region are filled with garbage; the
    tokens do not change, with verify steps and replay included."""
    model = build_model("hybrid")
    ps, params = prompts(model.config.vocab_size), SamplingParams(max_tokens=24, ignore_eos=True)
    spec = {"method": "draft_model", "model": build_model("hybrid"), "num_speculative_tokens": 3}
    fast = dict(attn_backend="triton", ssm_backend="triton", compile_mode="cudagraph", speculative_config=spec,
                **OPTIONS)
    ref = tokens(LLM(model, **fast), ps, params)
    llm = LLM(model, **fast)
    llm.engine.runner.poison = llm.drafter.runner.poison = True
    assert tokens(llm, ps, params) == ref
    assert llm.engine.runner.num_replays > 0 and llm.engine.runner._pool_poisoner.bytes > 0


@pytest.mark.parametrize("name", zoo_names())
def test_dynamo_backend_on_the_gpu(name):
    """torch.compile(model, backend="autodeploy") on CUDA (SDPA attention, Triton Mamba2 kernels
    through prepare(), inductor): logits within 1e-3 of the eager model (float32; TF32 off)."""
    from autodeploy.dynamo_backend import prepare

    torch._dynamo.reset()
    model = build_model(name).cuda()
    ids = torch.randint(0, model.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(0)).cuda()
    pos = torch.arange(70, device="cuda")[None]
    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        compiled = torch.compile(prepare(model), backend="autodeploy")
        got = compiled(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
