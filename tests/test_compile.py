"""Compile modes on the CPU: inductor gives eager's tokens; CUDA-graph modes refuse what they
cannot do. (CUDA graphs themselves are checked in tests/test_gpu.py.)"""

import pytest
import torch

from autodeploy import LLM, DeployConfig, SamplingParams
from autodeploy.models import build_model, zoo_names
from autodeploy.runtime.runner import COMPILE_MODES, default_capture_sizes


def test_inductor_gives_eager_tokens_with_speculation():
    model = build_model("hybrid")
    g = torch.Generator().manual_seed(0)
    ps = [{"prompt_token_ids": torch.randint(0, 256, (n,), generator=g).tolist()} for n in (3, 30)]
    ps.append({"prompt_token_ids": [9, 8, 7] * 7})
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    opts = dict(max_batch_size=2, max_seq_len=96, max_num_tokens=16, page_size=8,
                speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    ref = [o.outputs[0].token_ids for o in LLM(model, **opts).generate(ps, params)]
    llm = LLM(model, compile_mode="torch-compile", **opts)
    assert llm.engine.runner.mode == "inductor"
    assert [o.outputs[0].token_ids for o in llm.generate(ps, params)] == ref
    assert llm.spec_stats.num_verify_steps > 0


def test_inductor_on_gemma3_transposed_norms():
    """Gemma 3 normalises transposed per-head q/k views: inductor trusts the ops' fake strides, so a
    fake that declares another layout than the op returns fails here (fast check of the slow run)."""
    model = build_model("gemma3")
    prompt = {"prompt_token_ids": torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(2)).tolist()}
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    opts = dict(max_batch_size=1, max_seq_len=32, max_num_tokens=16, page_size=8)
    ref = LLM(model, **opts).generate([prompt], params)[0].outputs[0].token_ids
    assert LLM(model, compile_mode="inductor", **opts).generate([prompt], params)[0].outputs[0].token_ids == ref


def test_compile_mode_names_and_errors():
    assert COMPILE_MODES["torch-opt"] == "inductor+cudagraph" and COMPILE_MODES["torch-simple"] == "eager"
    with pytest.raises(ValueError, match="compile_mode 'fast' unknown"):
        DeployConfig(compile_mode="fast")
    with pytest.raises(ValueError, match="needs device='cuda'"):
        DeployConfig(compile_mode="cudagraph")
    with pytest.raises(ValueError, match="capture-safe"):
        DeployConfig(compile_mode="cudagraph", device="cuda", attn_backend="torch")
    assert default_capture_sizes(8, 0, 128) == [1, 2, 4, 8]
    assert default_capture_sizes(6, 3, 16) == [1, 2, 4, 8, 16]  # 6 lanes x 4 tokens, capped by the budget


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo_names())
def test_inductor_on_every_zoo_model(name):
    """Opt-in (-m slow, about 4 minutes on 2 cores): inductor == eager tokens on the whole zoo."""
    model = build_model(name)
    g = torch.Generator().manual_seed(1)
    ps = [{"prompt_token_ids": torch.randint(0, 256, (n,), generator=g).tolist()} for n in (5, 40)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    opts = dict(max_batch_size=2, max_seq_len=64, max_num_tokens=16, page_size=8)
    ref = [o.outputs[0].token_ids for o in LLM(model, **opts).generate(ps, params)]
    got = [o.outputs[0].token_ids for o in LLM(model, compile_mode="inductor", **opts).generate(ps, params)]
    assert got == ref
