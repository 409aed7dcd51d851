"""Tensor parallelism end to end: 2 CPU processes (gloo) under torchrun, the same code path NCCL
takes on GPUs. Sharded tokens equal unsharded ones for a hybrid (Mamba2 + sliding-window + full
attention) and a sliding-window model; each rank's caches are half the unsharded ones; sampling
agrees across ranks; ``autodeploy run --tp 2`` relaunches itself and prints rank 0's tokens."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tp_worker
from autodeploy import LLM, SamplingParams
from autodeploy.cli import main as cli_main
from autodeploy.models import build_model

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("hybrid", "gemma3")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo over loopback, whatever the host name resolves to
    return env


def _unsharded(name: str, device: str = "cpu") -> tuple[list[list[int]], dict[str, int]]:
    llm = LLM(build_model(name), tensor_parallel_size=1, device=device, **tp_worker.ENGINE)
    outs = llm.generate([{"prompt_token_ids": p} for p in tp_worker.prompts()],
                        SamplingParams(max_tokens=tp_worker.NEW_TOKENS, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs], llm.cache_bytes()


def _launch(out: Path, *worker_args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(ROOT / "tests" / "tp_worker.py"), str(out), *worker_args],
        env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What each of 2 ranks saw ("MODEL/eager"), and the unsharded engine's tokens and cache bytes."""
    out = tmp_path_factory.mktemp("tp") / "ranks.json"
    proc = _launch(out, *MODELS)
    torch.set_num_threads(1)  # the references run while the ranks do
    try:
        reference = {name: _unsharded(name) for name in MODELS}
    finally:
        log, _ = proc.communicate(timeout=300)
        torch.set_num_threads(2)
    assert proc.returncode == 0, log[-4000:]
    report = json.loads(out.read_text())
    return {name: report[f"{name}/eager"] for name in MODELS}, reference


@pytest.mark.parametrize("name", MODELS)
def test_sharded_tokens_equal_unsharded(two_ranks, name):
    ranks, reference = two_ranks
    tokens, _ = reference[name]
    assert [r["tensor_parallel_size"] for r in ranks[name]] == [2, 2]
    for r in ranks[name]:
        assert r["greedy"] == tokens  # float32, token for token, on every rank
    assert ranks[name][0]["all_reduces"] > 0


@pytest.mark.parametrize("name", MODELS)
def test_each_rank_holds_half_the_caches(two_ranks, name):
    ranks, reference = two_ranks
    _, unsharded = reference[name]
    for r in ranks[name]:
        assert r["cache_bytes"].keys() == unsharded.keys()
        for pool, nbytes in unsharded.items():
            assert 2 * r["cache_bytes"][pool] == nbytes, pool  # KV heads, SSM heads, conv channels halved


def test_sampling_agrees_across_ranks(two_ranks):
    ranks, _ = two_ranks
    for name in MODELS:
        first, second = ranks[name]
        assert first["sampled"] == second["sampled"]
        assert first["sampled"] != first["greedy"]  # it did sample


def test_cli_tp_relaunches_under_torchrun(capfd):
    args = ["run", "--model", "llama", "--prompt-ids", "1,2,3", "--prompt-ids", "5,6,7,8,9", "--max-tokens", "6"]
    assert cli_main(args) == 0
    single = [line for line in capfd.readouterr().out.splitlines() if line.startswith("[")]
    proc = subprocess.run([sys.executable, "-m", "autodeploy", *args, "--tp", "2"], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert [line for line in lines if line.startswith("[")] == single  # rank 0 alone prints
    assert any(line.startswith("tensor parallel: 2 ranks (gloo); caches per rank") for line in lines)


def test_cli_tp_error_keeps_the_exit_code_of_the_failing_ranks(tmp_path):
    missing = str(tmp_path / "no-such-checkpoint")
    proc = subprocess.run([sys.executable, "-m", "autodeploy", "run", "--model", missing, "--prompt-ids", "1,2",
                           "--tp", "2"], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-4000:]  # bad input, as without --tp
    errors = [line for line in proc.stderr.splitlines() if line.startswith("autodeploy: error:")]
    assert errors and all("does not exist" in e for e in errors)
    assert "Traceback" not in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_nccl_on_two_gpus_eager_and_cuda_graphs(tmp_path):
    """The same path on GPUs: NCCL chosen from the device, all-reduces inside captured CUDA graphs."""
    modes = ("eager", "cudagraph", "inductor+cudagraph")
    out = tmp_path / "ranks.json"
    proc = _launch(out, "--device", "cuda", "--compile-modes", ",".join(modes), *MODELS)
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-4000:]
    report = json.loads(out.read_text())
    for name in MODELS:
        tokens, unsharded = _unsharded(name, "cuda")
        for mode in modes:
            for r in report[f"{name}/{mode}"]:
                assert r["greedy"] == tokens, (name, mode)
                assert {p: 2 * b for p, b in r["cache_bytes"].items()} == unsharded, (name, mode)
            first, second = report[f"{name}/{mode}"]
            assert first["sampled"] == second["sampled"], (name, mode)


def test_tensor_parallel_size_needs_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        LLM(build_model("llama"), tensor_parallel_size=2)


def test_move_graph_module_moves_every_tensor_and_device_argument():
    """A tensor-parallel GPU rank builds on the host and ships its graph: every tensor the graph
    reads and every device baked into a node follow (checked here by moving to the meta device)."""
    from autodeploy.fx_utils import move_graph_module
    from autodeploy.transforms.pipeline import PERF_TRANSFORMS

    llm = LLM(build_model("llama"), max_batch_size=2, max_seq_len=32,
              perf_transforms=dict.fromkeys(PERF_TRANSFORMS, False))
    gm = llm.gm
    baked = [n for n in gm.graph.nodes if n.op == "call_function"
             and any(isinstance(a, torch.device) for a in (*n.args, *n.kwargs.values()))]
    assert baked  # the rotary embedding's to(device=cpu): without match_rope it stays in the graph
    move_graph_module(gm, "meta")
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            assert value.device.type == "meta", node.target
        if node.op == "call_function":
            devices = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.device)]
            assert all(d.type == "meta" for d in devices), node
