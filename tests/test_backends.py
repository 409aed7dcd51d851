"""Backend selection, and whole models on the Triton backend against the torch backend."""

import pytest
import torch

from autodeploy import LLM, DeployConfig, SamplingParams, backends
from autodeploy.models import build_model
from autodeploy.transforms.pipeline import resolve_backends


def test_auto_picks_the_best_available_and_bad_requests_say_why(monkeypatch):
    # (no model is built while TRITON_INTERPRET is unset: transformers imports triton, which reads it once)
    assert backends.resolve("attention", "auto", "cpu") == "torch"  # never the interpreter unless asked
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert backends.resolve("attention", "auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="Triton kernels need a CUDA device"):
        backends.resolve("attention", "triton", "cpu")
    with pytest.raises(ValueError, match="no 'flashinfer' backend for attention|flashinfer"):
        backends.resolve("attention", "flashinfer", "cpu")
    with pytest.raises(ValueError, match="no 'tpu' backend for ssd_scan"):
        backends.resolve("ssd_scan", "tpu", "cpu")
    with pytest.raises(ValueError, match="attention backend 'triton' is unavailable"):
        resolve_backends(DeployConfig(attn_backend="triton"))  # what LLM(...) calls first
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.resolve("attention", "triton", "cpu") == "triton"


def test_auto_skips_flashinfer_for_float32_models(monkeypatch):
    """flashinfer's kernels are built for float16/bfloat16: a float32 model on a GPU gets Triton
    from auto, and asking for flashinfer says why (found on the H100: auto once picked it for a
    float32 model and flashinfer failed inside plan() with a KeyError)."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: object() if name == "flashinfer" else real_find_spec(name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backends.resolve("ssd_scan", "flashinfer", "cuda", "bfloat16") == "flashinfer"
    monkeypatch.setitem(backends.AUTO_ORDER, "ssd_scan", ("flashinfer", "triton", "torch"))  # were it measured first
    assert backends.resolve("ssd_scan", "auto", "cuda", "bfloat16") == "flashinfer"
    assert backends.resolve("ssd_scan", "auto", "cuda", "float32") == "triton"
    with pytest.raises(ValueError, match="flashinfer's kernels take float16 or bfloat16 \\(dtype is 'float32'\\)"):
        backends.resolve("attention", "flashinfer", "cuda", "float32")
    with pytest.raises(ValueError, match="dtype is 'float32'"):
        resolve_backends(DeployConfig(device="cuda", dtype="float32", ssm_backend="flashinfer"))


def test_auto_follows_the_measured_order_per_family(monkeypatch):
    """On a GPU with flashinfer, for a bf16 model: Triton for both families (flashinfer's attention
    decode steps were 1.4-1.9x slower, host plan() included; its SSM decode kernel measured even
    with the Triton scan, which alone fuses the Mamba2 decode); flashinfer still on request."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: object() if name == "flashinfer" else real_find_spec(name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backends(DeployConfig(device="cuda", dtype="bfloat16")) == {"attention": "triton", "ssm": "triton"}
    ngram = {"method": "ngram", "num_speculative_tokens": 3}  # speculation changes nothing here
    assert resolve_backends(DeployConfig(device="cuda", dtype="bfloat16", speculative_config=ngram))["ssm"] == "triton"
    cuda_bf16 = dict(device="cuda", dtype="bfloat16")
    assert resolve_backends(DeployConfig(**cuda_bf16, attn_backend="flashinfer"))["attention"] == "flashinfer"
    assert resolve_backends(DeployConfig(**cuda_bf16, ssm_backend="flashinfer"))["ssm"] == "flashinfer"
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: None if name == "flashinfer" else real_find_spec(name))
    assert resolve_backends(DeployConfig(device="cuda", dtype="bfloat16")) == {"attention": "triton", "ssm": "triton"}


def test_triton_attention_backend_gives_the_torch_backend_tokens():
    """Gemma3 (sliding window 16 + full attention) with the Triton attention kernel under the
    interpreter: greedy tokens equal the torch backend's for prompts past the window."""
    pytest.importorskip("triton")
    model = build_model("gemma3")
    g = torch.Generator().manual_seed(0)
    ps = [{"prompt_token_ids": torch.randint(0, 256, (n,), generator=g).tolist()} for n in (3, 30)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    options = dict(max_batch_size=2, max_seq_len=64, max_num_tokens=16, page_size=8)
    ref = LLM(model, attn_backend="torch", **options).generate(ps, params)
    llm = LLM(model, attn_backend="triton", **options)
    assert llm.record.backends["attention"] == "triton"
    got = llm.generate(ps, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]


def test_triton_ssm_and_attention_backends_with_speculation_give_the_torch_tokens(monkeypatch):
    """The hybrid (Mamba2 + sliding window + full attention) entirely on Triton kernels under the
    interpreter, with draft-model speculation (verify lanes, replay), every step poisoned
    (runtime/poison.py: NaN in every unowned page, ring row, slot and replay entry), prefill
    chunks of >= 10 tokens through the SSD scan's chunk-parallel launches (chunks of 4): the torch
    backend's tokens."""
    pytest.importorskip("triton")
    from autodeploy.custom_ops import triton_ssd_chunks

    monkeypatch.setattr(triton_ssd_chunks, "PARALLEL_MIN_TOKENS", 10)
    monkeypatch.setattr(triton_ssd_chunks, "PARALLEL_CHUNK", 4)
    model = build_model("hybrid")
    g = torch.Generator().manual_seed(1)
    ps = [{"prompt_token_ids": torch.randint(0, 256, (n,), generator=g).tolist()} for n in (4, 29)]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    options = dict(max_batch_size=2, max_seq_len=64, max_num_tokens=16, page_size=8,
                   speculative_config={"method": "draft_model", "model": build_model("hybrid"),
                                       "num_speculative_tokens": 2})
    ref = LLM(model, attn_backend="torch", ssm_backend="torch", **options).generate(ps, params)
    llm = LLM(model, attn_backend="triton", ssm_backend="triton", **options)
    assert llm.record.backends == {"attention": "triton", "ssm": "triton"}
    llm.engine.runner.poison = llm.drafter.runner.poison = True
    got = llm.generate(ps, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    assert llm.spec_stats.num_accepted_tokens > 0


def test_a_backend_is_one_table_entry_its_op_and_its_host_half(monkeypatch):
    """A backend added by one CACHED_OPS entry (tests/planned_backend.py: an op and a host half that
    no transform or runtime module names): the runner plans it before every step (the op checks
    that its plan saw the very step it runs), and its tokens equal the torch backend's."""
    import planned_backend

    monkeypatch.setitem(backends.CACHED_OPS["attention"], "planned", backends.CachedOp(
        "planned_backend", "planned_cached_attention", host_half="planned_backend:PlannedSteps"))
    model = build_model("llama")
    options = dict(max_batch_size=3, max_seq_len=64, max_num_tokens=32)
    g = torch.Generator().manual_seed(5)
    prompts = [{"prompt_token_ids": torch.randint(0, 256, (n,), generator=g).tolist()} for n in (5, 40, 17)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(model, **options).generate(prompts, params)]
    llm = LLM(model, attn_backend="planned", self_check=False, **options)
    assert llm.record.backends["attention"] == "planned"
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want
    (half,) = llm.engine.runner.host_halves  # llama: one pool, one spec, so one host half
    assert isinstance(half, planned_backend.PlannedSteps) and half.planned == llm.engine.runner.num_runs > 0
