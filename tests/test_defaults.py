"""Defaults from the model and the device (autodeploy.defaults): pure choices tested on the CPU with
the device's facts as inputs; on a GPU (marked gpu) ``LLM(model)`` with no options is the fast
configuration and takes a 512-token prompt."""

import logging

import pytest
import torch

from autodeploy import LLM, DeployConfig, SamplingParams, defaults
from autodeploy.defaults import DeviceFacts
from autodeploy.models import build_model

GiB = 2**30
H200 = DeviceFacts("cuda", "NVIDIA H200", total_bytes=140 * GiB, free_bytes=138 * GiB)


def _config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=4, head_dim=64, max_position_embeddings=32768)
    return LlamaConfig(**{**base, **kw})


def test_device_dtype_and_compile_mode():
    assert defaults.default_device(True) == "cuda" and defaults.default_device(False) == "cpu"
    assert defaults.default_dtype("cpu", torch.bfloat16) == "float32"
    assert defaults.default_dtype("cuda", torch.bfloat16) == "bfloat16"
    assert defaults.default_dtype("cuda:1", torch.float16) == "float16"
    assert defaults.default_dtype("cuda", torch.float32) == "bfloat16"
    assert defaults.default_compile_mode("cuda", "auto", "auto") == "cudagraph"
    assert defaults.default_compile_mode("cuda", "torch", "auto") == "eager"  # host-syncing ops cannot be captured
    assert defaults.default_compile_mode("cpu", "auto", "auto") == "eager"


def test_cpu_sizes_stay_small():
    given = dict(max_seq_len=None, max_batch_size=None, max_num_tokens=None, num_pages=None, max_cache_bytes=None)
    got = defaults.choose(given, DeviceFacts("cpu"), _config(), 4, 16, 0.9, 0)
    assert got == dict(given, max_seq_len=2048, max_batch_size=8, max_num_tokens=128)
    assert defaults.choose(given, DeviceFacts("cpu"), _config(max_position_embeddings=1024), 4, 16, 0.9, 0)[
        "max_seq_len"] == 1024


def test_gpu_sizes_fill_the_memory_fraction():
    given = dict(max_seq_len=None, max_batch_size=None, max_num_tokens=None, num_pages=None, max_cache_bytes=None)
    got = defaults.choose(given, H200, _config(), 2, 16, 0.9, 0)
    assert got["max_batch_size"] == 64 and got["max_num_tokens"] == 2048 and got["max_seq_len"] == 32768
    reserve = defaults.activation_bytes(1024, 32000, 2048, 64)
    assert got["max_cache_bytes"] == int(0.9 * 140 * GiB) - 2 * GiB - reserve
    half = defaults.choose(given, H200, _config(), 2, 16, 0.5, 0)["max_cache_bytes"]
    assert half == int(0.5 * 140 * GiB) - 2 * GiB - reserve


def test_gpu_context_capped_by_what_fits():
    given = dict(max_seq_len=None, max_batch_size=4, max_num_tokens=256, num_pages=None, max_cache_bytes=None)
    small = DeviceFacts("cuda", "small GPU", total_bytes=8 * GiB, free_bytes=int(6.4 * GiB))
    config = _config(max_position_embeddings=1 << 20)
    got = defaults.choose(given, small, config, 2, 16, 0.9, 0)
    per_token = defaults.kv_bytes_per_token(config, 2)
    assert per_token == 2 * 16 * 4 * 64 * 2
    assert got["max_seq_len"] == got["max_cache_bytes"] // per_token // 16 * 16 < 1 << 20


def test_what_the_user_gives_wins():
    given = dict(max_seq_len=300, max_batch_size=2, max_num_tokens=32, num_pages=40, max_cache_bytes=None)
    assert defaults.choose(given, H200, _config(), 2, 16, 0.9, 0) == given


def test_no_room_left_is_a_clear_error():
    full = DeviceFacts("cuda", "NVIDIA H200", total_bytes=140 * GiB, free_bytes=10 * GiB)
    given = dict(max_seq_len=None, max_batch_size=None, max_num_tokens=None, num_pages=None, max_cache_bytes=None)
    with pytest.raises(ValueError, match="no GPU memory left for caches on NVIDIA H200.*raise gpu_memory_utilization"):
        defaults.choose(given, full, _config(), 2, 16, 0.9, 0)


def test_checkpoint_dtype(tmp_path):
    model = build_model("llama").to(torch.bfloat16)
    assert defaults.checkpoint_dtype(model) == torch.bfloat16
    model.save_pretrained(tmp_path)
    assert defaults.checkpoint_dtype(tmp_path) == torch.bfloat16
    assert defaults.checkpoint_dtype(tmp_path / "missing") is None


def test_config_validation():
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        DeployConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="max_seq_len must be a positive int"):
        DeployConfig(max_seq_len=0)
    assert DeployConfig(device="cpu").compile_mode == "eager" and DeployConfig(device="cpu").dtype == "float32"


def test_cpu_llm_logs_its_choices_in_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="autodeploy"):
        llm = LLM(build_model("llama"), device="cpu")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine config")]
    assert lines == ["engine config (cpu): device=cpu dtype=float32 compile_mode=eager max_seq_len=1024 "
                     "max_batch_size=8 max_num_tokens=128"]
    assert (llm.config.max_seq_len, llm.config.max_batch_size, llm.config.compile_mode) == (1024, 8, "eager")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_defaults_take_a_long_prompt():
    """No options on a GPU: CUDA graphs, the checkpoint's dtype, the model's context length, caches
    from free memory, weights loaded onto the GPU; a 512-token prompt with 8 new tokens is served
    and equals the eager run of the same weights."""
    model = build_model("hybrid").to(torch.bfloat16)
    llm = LLM(model)
    cfg = llm.config
    assert (cfg.device, cfg.dtype, cfg.compile_mode) == ("cuda", "bfloat16", "cudagraph")
    assert cfg.max_seq_len == model.config.max_position_embeddings and cfg.max_cache_bytes > 0
    assert next(llm.model.parameters()).is_cuda
    prompt = torch.randint(0, model.config.vocab_size, (512,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].token_ids
    eager = LLM(build_model("hybrid").to(torch.bfloat16), compile_mode="eager", max_seq_len=1024, max_cache_bytes=2**28)
    assert out == eager.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].token_ids
