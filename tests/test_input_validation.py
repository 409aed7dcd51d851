"""Bad input is a one-line error at the first place it can be seen (vLLM's conventions for
SamplingParams), never a bare assertion or a traceback deep inside torch or transformers."""

import math

import pytest
import torch

from autodeploy import LLM, SamplingParams
from autodeploy.cli import main
from autodeploy.models import build_model
from autodeploy.runtime.sampling import target_probs


@pytest.mark.parametrize("off", [0, -1])
def test_top_k_zero_and_minus_one_mean_off(off):
    params = SamplingParams(temperature=1.0, top_k=off)
    assert params.top_k == 0
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(target_probs(logits, params), torch.softmax(logits, -1))  # nothing filtered


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": math.nan}, "temperature must be a finite number"),
    ({"temperature": math.inf}, "temperature must be a finite number"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"temperature": "0.7"}, "temperature must be a finite number"),
    ({"top_k": 2.5}, "top_k must be an int"),
    ({"top_k": -2}, "top_k must be an int >= 1, or 0 / -1 for off"),
    ({"top_k": True}, "top_k must be an int"),
    ({"top_p": math.nan}, r"top_p must be a number in \(0, 1\]"),
    ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
    ({"stop_token_ids": 5}, r"got the int 5; write \[5\]"),
    ({"stop_token_ids": [1, "2"]}, "stop_token_ids must be a list of non-negative int"),
    ({"stop_token_ids": [-1]}, "stop_token_ids must be a list of non-negative int"),
    ({"max_tokens": True}, "max_tokens must be a positive int"),
    ({"seed": 1.5}, "seed must be an int in"),
    ({"seed": 2**64}, "seed must be an int in"),
    ({"ignore_eos": "yes"}, "ignore_eos must be a bool"),
])
def test_bad_sampling_params_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        SamplingParams(**kwargs)
    assert "\n" not in str(err.value)


def test_stop_token_ids_tuple_is_accepted():
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_says_so(capsys):
    with pytest.raises(ValueError, match=r"device='cuda' needs a usable GPU.*use device='cpu'"):
        LLM(build_model("llama"), device="cuda")
    assert main(["run", "--model", "llama", "--device", "cuda", "--prompt-ids", "1,2"]) == 3
    assert "no CUDA device is visible" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["{\"model_type\": \"llama\",", "[1, 2]", "\xff\xfe"])
def test_corrupt_config_json_is_reported(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match="config.json .*the checkpoint's config is corrupt"):
        LLM(str(tmp_path))


def test_unknown_cli_command_names_the_commands(capsys):
    for argv in (["frobnicate"], ["-v", "serv"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"unknown command {argv[-1]!r}; commands: run, serve, graph, info, bench" in err, err
