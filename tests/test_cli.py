"""The command line: every subcommand, exit codes, errors. The demo, a bad path and a bad option run
as real processes (``python -m autodeploy``); the rest call ``main(argv)`` in this process."""

import json
import logging
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from autodeploy import cli
from autodeploy.cli import main


def _cli(*args, timeout=300):
    # as a user runs it: without the Triton interpreter conftest turns on (it slows transformers' Mamba path)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "autodeploy", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autodeploy: error: ") and "Traceback" not in stderr, stderr
    return lines[0]


# -- real processes ------------------------------------------------------------------------------------


def test_main_job_runs_and_passes():
    proc = _cli()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "equal to transformers" in proc.stdout and proc.stdout.strip().endswith("OK")
    assert "[insert_cached_ssm] 4 matches" in proc.stdout
    assert "INFO" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr  # quiet by default


def test_missing_model_directory_is_bad_input():
    proc = _cli("run", "--model", "/no/such/checkpoint", "--prompt-ids", "1,2")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "/no/such/checkpoint" in _one_line_error(proc.stderr)


def test_bad_option_is_a_usage_error():
    proc = _cli("run", "--max-tokens", "many")
    assert proc.returncode == 2 and "invalid int value: 'many'" in proc.stderr and "Traceback" not in proc.stderr


# -- in process: run -----------------------------------------------------------------------------------


def test_run_prompt_ids_then_stream_the_same_tokens(capsys):
    assert main(["-v", "run", "--prompt-ids", "1,2,3", "--prompt-ids", "4,5", "--max-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("[0] prompt 3 tokens -> 4 tokens (length): ")
    assert lines[1].startswith("[1] prompt 2 tokens -> 4 tokens (length): ")
    assert lines[2].startswith("2 prompt(s), 8 tokens in ")
    tokens = lines[0].split(": ", 1)[1]
    assert len(tokens.split()) == 4
    assert "INFO autodeploy" in err and "%|" not in err  # -v logs; no progress bar when not a terminal
    assert logging.getLogger("autodeploy").level == logging.NOTSET  # main() restores the logger
    assert main(["run", "--prompt-ids", "1,2,3", "--max-tokens", "4", "--stream"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].strip() == f"[0] {tokens}"  # greedy: streamed tokens are the same
    assert out.splitlines()[1] == "[0] done (length): 4 tokens" and err == ""
    assert main(["run", "--prompt-ids", "1,2,3", "--prompt-ids", "7", "--max-tokens", "2", "--stream",
                 "--temperature", "0.9", "--top-k", "20", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("[0] +") == 2 and out.count("[1] +") == 2 and "[1] done (length): 2 tokens" in out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved zoo llama with a small byte-level BPE tokenizer: a checkpoint directory as a user has one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from autodeploy.models import build_model

    path = tmp_path_factory.mktemp("ckpt")
    build_model("llama").save_pretrained(path)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 4, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    return path


def test_run_checkpoint_directory_with_prompts_file_and_demo(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("1, 2, 3\n\nthe quick fox\n7\n")
    assert main(["run", "--model", str(checkpoint), "--prompts-file", str(prompts), "--prompt", "hello",
                 "--max-tokens", "3"]) == 0
    out = capsys.readouterr().out
    # --prompt first, then the file's lines: ids, text, ids
    assert "[1] prompt 3 tokens -> 3 tokens" in out and "[3] prompt 1 tokens -> 3 tokens" in out
    assert out.count("    text: ") == 4
    # no prompts: the self-checking demo runs on the directory's model too
    assert main(["run", "--model", str(checkpoint), "--max-tokens", "2"]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")


def test_run_errors(capsys, tmp_path):
    from autodeploy.models import build_model

    build_model("llama").save_pretrained(tmp_path / "no_tokenizer")  # a checkpoint without a tokenizer
    capsys.readouterr()  # (its progress bar)
    assert main(["run", "--model", str(tmp_path / "no_tokenizer"), "--prompt", "hello"]) == 3
    assert "--prompt-ids" in _one_line_error(capsys.readouterr().err)
    assert main(["run", "--prompt-ids", "1,2", "--max-batch-size", "0"]) == 3  # DeployConfig says no
    assert "max_batch_size" in _one_line_error(capsys.readouterr().err)
    assert main(["run", "--prompts-file", str(tmp_path / "missing.txt")]) == 3
    assert "missing.txt" in _one_line_error(capsys.readouterr().err)
    assert main(["run", "--prompt-ids", "1,999"]) == 3
    assert "vocabulary" in _one_line_error(capsys.readouterr().err)
    with pytest.raises(ValueError):  # --debug: the real exception
        main(["--debug", "run", "--prompt-ids", "1,2", "--max-batch-size", "0"])
    for argv in (["run", "--stream"], ["run", "--temperature", "0.5"], ["run", "--prompt-ids", "1,x"],
                 ["run", "--speculative", "ngram"], ["run", "--dtype", "int8"], ["graph"], ["run", "--bogus"],
                 ["frobnicate"]):
        assert main(argv) == 2, argv
    capsys.readouterr()


def test_help_everywhere(capsys):
    for argv in (["--help"], ["run", "--help"], ["graph", "--help"], ["info", "--help"], ["bench", "--help"],
                 ["--version"]):
        assert main(argv) == 0, argv
    out = capsys.readouterr().out
    assert out.count("usage: autodeploy") == 5 and "--prompt-ids" in out and "--speculative" in out


def test_default_command_is_run():
    assert cli._with_default_command([]) == ["run"]
    assert cli._with_default_command(["-v", "--model", "llama"]) == ["-v", "run", "--model", "llama"]
    assert cli._with_default_command(["--debug", "graph", "x"]) == ["--debug", "graph", "x"]
    assert cli._with_default_command(["--help"]) == ["--help"]


def test_speculative_option():
    assert cli.speculative("ngram:3") == {"method": "ngram", "num_speculative_tokens": 3}
    assert cli.speculative("draft:/a/b:c:2") == {"method": "draft_model", "model": "/a/b:c",
                                                 "num_speculative_tokens": 2}


# -- in process: graph, info, bench --------------------------------------------------------------------


def test_graph_writes_pictures(tmp_path, capsys):
    assert main(["graph", "hybrid", "--out", str(tmp_path), "--max-batch-size", "2", "--speculative", "ngram:2"]) == 0
    out = capsys.readouterr().out
    for needle in ("[insert_cached_attention] 2 matches", "attention x2 -> torch_cached_attention x2",
                   "prepare_attention_metadata", "kv_swa_24", "replay", "max_batch_size=2", "backends:"):
        assert needle in out, needle
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["hybrid.html", "hybrid_after.svg", "hybrid_before.svg", "hybrid_summary.txt"]
    for name in ("hybrid_before.svg", "hybrid_after.svg"):
        svg = (tmp_path / name).read_text()
        ET.fromstring(svg)
        assert all(f"model.layers.{i}" in svg for i in range(8))
    assert "replay_x_0" in (tmp_path / "hybrid_after.svg").read_text()
    assert main(["graph", str(tmp_path / "nope" / "dir")]) == 3
    _one_line_error(capsys.readouterr().err)


def test_no_transform_switches_a_perf_transform_off(tmp_path, capsys):
    assert main(["graph", "llama", "--out", str(tmp_path), "--no-transform", "fuse_projections",
                 "--no-transform", "match_rope"]) == 0
    out = capsys.readouterr().out
    assert "[match_rms_norm]" in out and "[fuse_projections]" not in out and "[match_rope]" not in out
    # an unknown name is a usage error listing the known ones
    assert main(["graph", "llama", "--no-transform", "fuse_everything"]) == 2
    assert "fuse_projections" in capsys.readouterr().err


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out.splitlines()[0] and "transformers" in out and "triton" in out
    for backend in ("torch", "triton", "flashinfer"):
        assert f"  {backend} " in out
    assert "backends on cpu:" in out and "backends on cuda:" in out
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backends"]["cpu"]["torch"]["available"] is True
    assert data["backends"]["cpu"]["auto"]["attention"] == "torch"
    assert data["backends"]["cpu"]["flashinfer"]["reason"]  # never on a CPU


def test_bench_cpu_quick_run(capsys):
    assert main(["bench", "--cpu", "--batch-size", "2", "--prompt-len", "8", "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    # the host reads each step's tokens one step late (async scheduling): the first tokens show up
    # after the second step, so 1 or 2 of the 4 steps count as prefill
    assert out.startswith("CPU quick run") and re.search(r"decode: [23] steps, 6 tokens", out) and "tok/s (CPU)" in out


def test_bench_on_a_gpu_runs_the_benchmark_script(monkeypatch, capsys):
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(subprocess, "run",
                        lambda cmd, env: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    assert main(["bench", "--batch-size", "8", "--", "--hf", "--compile", "eager"]) == 0
    (cmd,) = calls
    assert cmd[1].endswith("benchmarks/bench_decode.py") and cmd[2:] == ["--batch", "8", "--hf", "--compile", "eager"]
    assert capsys.readouterr().out.startswith("+ ")
