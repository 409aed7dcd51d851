"""The build-time self-check (autodeploy/self_check.py): a short probe through the engine's own
runner against the model's own forward. It must catch what a cached engine would serve wrongly,
name the first module whose output differs, stay quiet on correct models in every dtype, and be
cheap."""

import pytest
import torch

from autodeploy import LLM, SamplingParams
from autodeploy.models import build_model
from autodeploy.runtime.pools import PoolSizes
from autodeploy.self_check import SelfCheckError, probe_schedule, self_check
from handwritten import TinyLM, greedy, prompts

ENGINE = dict(max_batch_size=4, max_seq_len=64, max_num_tokens=16, page_size=4)


def test_forward_ignoring_position_ids_is_caught():
    """Positions from arange(seq_len) inside forward: builds without any warning otherwise and
    gives wrong tokens; the self-check names the first module fed by the attention and the cause."""
    with pytest.raises(SelfCheckError, match=r"First module whose output differs: blocks\.0\.out \(Linear\), "
                                             r"inside layer blocks\.0 \(Block\).*Probably not captured: positions"):
        LLM(TinyLM(positions="arange").eval(), **ENGINE)


def test_switched_off_the_same_model_serves_wrong_tokens():
    model = TinyLM(positions="arange").eval()
    llm = LLM(model, self_check=False, **ENGINE)
    ps = prompts()
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], SamplingParams(max_tokens=8))
    assert any(o.outputs[0].token_ids != greedy(model, p, 8) for p, o in zip(ps, outs))


@pytest.mark.parametrize("mixer", ["cumsum", "seqmean"])
def test_a_token_mixing_op_no_cache_holds_is_caught(mixer):
    """A running mean over the tokens (causal, but its state is lost between steps) and a mean over
    the whole sequence (which, in a batched step, mixes the requests): both named at the mixer."""
    with pytest.raises(SelfCheckError, match=r"First module whose output differs: blocks\.0\.mix \(TokenMixer\)"
                                             r".*Probably not captured: the requests' separation"):
        LLM(TinyLM(mixer=mixer).eval(), **ENGINE)


@pytest.mark.parametrize("name, dtype", [("hybrid", "bfloat16"), ("gemma3", "bfloat16"), ("hybrid", "float16"),
                                         ("llama", "float32")])
def test_no_false_alarm_on_correct_models(name, dtype):
    LLM(build_model(name), dtype=dtype, **ENGINE)  # raises on a mismatch


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_still_catches_lost_positions(dtype):
    with pytest.raises(SelfCheckError, match="relative RMS logit difference .*positions"):
        LLM(TinyLM(positions="arange").eval(), dtype=dtype, **ENGINE)


def test_costs_well_under_a_second_on_the_embedded_model():
    """The embedded demo model with the default engine options, on the CPU, after the first run
    (about 0.06 s on one thread here; on one thread because this machine's cores may be shared with
    other processes, where oversubscribed intra-op threads make every small op slow)."""
    model = build_model("hybrid")
    llm = LLM(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds = min(self_check(model, llm.engine.runner, torch.float32) for _ in range(3))
    finally:
        torch.set_num_threads(threads)
    assert seconds < 0.5, seconds
    llm.engine.pools.assert_empty()  # the probe's slots and pages are given back


def test_speculative_configs_are_checked_too():
    """n-gram speculation: the target is checked; a draft model: its own engine is checked too."""
    bad = TinyLM(positions="arange").eval()
    with pytest.raises(SelfCheckError, match="for the engine"):
        LLM(bad, speculative_config={"method": "ngram", "num_speculative_tokens": 3}, **ENGINE)
    with pytest.raises(SelfCheckError, match="for the draft model's engine"):
        LLM(TinyLM().eval(), speculative_config={"method": "draft_model", "model": bad, "num_speculative_tokens": 2},
            **ENGINE)
    LLM(TinyLM().eval(), speculative_config={"method": "draft_model", "model": TinyLM(seed=1).eval(),
                                             "num_speculative_tokens": 2}, **ENGINE)


def test_probe_fits_any_engine_limits():
    for sizes in (PoolSizes(1, 64, 16, 128), PoolSizes(8, 8, 4, 2), PoolSizes(2, 4, 1, 1), PoolSizes(4, 512, 16, 128)):
        lens, steps = probe_schedule(sizes)
        assert max(lens) <= sizes.max_seq_len
        for step in steps:
            assert len(step.lanes) <= sizes.max_batch_size and sum(n for *_, n in step.lanes) <= sizes.max_num_tokens
        for r, n in enumerate(lens):  # every request's tokens run exactly once, in order
            runs = [(start, k) for step in steps for q, start, k in step.lanes if q == r]
            assert [s for s, _ in runs] == list(__import__("itertools").accumulate([0] + [k for _, k in runs[:-1]]))
            assert sum(k for _, k in runs) == n
    assert probe_schedule(PoolSizes(2, 3, 1, 8)) is None or max(probe_schedule(PoolSizes(2, 3, 1, 8))[0]) <= 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile_mode", ["eager", "cudagraph"])
def test_no_false_alarm_in_bf16_on_the_gpu(compile_mode):
    """Real bf16 kernels (the auto backends: Triton attention, flashinfer SSM decode) and CUDA graphs:
    the self-check passes on correct models and stays cheap."""
    for name in ("hybrid", "gemma3", "llama"):
        model = build_model(name)
        llm = LLM(model, device="cuda", dtype="bfloat16", compile_mode=compile_mode, max_cache_bytes=2**28)
        seconds = min(self_check(llm.model, llm.engine.runner, torch.bfloat16) for _ in range(2))
        assert seconds < 0.5, (name, seconds)
