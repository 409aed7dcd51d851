"""Eager CPU runs call the autodeploy ops' Python bodies (runtime/direct_calls.py): the same graph
node for node, and every step's logits and cache pools equal, bit for bit, to running the graph
through ``torch.ops`` dispatch (attention, sliding-window and Mamba2 layers, prefill and decode)."""

import functools

import pytest
import torch

from autodeploy import LLM
from autodeploy.models import build_model
from autodeploy.runtime.batch import LaneInput
from autodeploy.runtime.direct_calls import direct_calls, python_body


def _attr(module, dotted: str):
    return functools.reduce(getattr, dotted.split("."), module)


def test_python_body_only_for_autodeploy_ops():
    assert python_body(torch.ops.autodeploy.rms_norm.default).__name__ == "rms_norm"
    assert python_body(torch.ops.aten.add.Tensor) is None
    assert python_body(len) is None


@pytest.fixture(scope="module", params=["gemma3", "hybrid"])
def llm(request):
    return LLM(build_model(request.param), device="cpu", max_batch_size=2, max_seq_len=64, max_num_tokens=32)


def test_default_cpu_runner_calls_bodies_on_the_same_graph(llm):
    runner = llm.engine.runner
    assert runner.fn is not runner.gm
    ops = [n for n in runner.gm.graph.nodes]
    direct = list(runner.fn.graph.nodes)
    assert [n.name for n in ops] == [n.name for n in direct]
    replaced = 0
    for a, b in zip(ops, direct):
        assert (a.op, str(a.args), str(a.kwargs)) == (b.op, str(b.args), str(b.kwargs))
        if python_body(a.target) is not None:
            assert b.target is python_body(a.target)
            replaced += 1
        else:
            assert b.target == a.target
    assert replaced > 10
    attrs = [n.target for n in direct if n.op == "get_attr"]
    assert attrs and all(_attr(runner.fn, t) is _attr(runner.gm, t) for t in attrs)  # shared, not copied


def test_steps_equal_dispatch_bit_for_bit(llm):
    runner = llm.engine.runner
    direct, pools = runner.fn, runner.pools.tensors
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (9, 6)]
    pages = [list(range(1, 5)), list(range(5, 9))]
    steps = [[LaneInput(prompts[0], 0, 1, pages[0]), LaneInput(prompts[1], 0, 2, pages[1])]]
    for i in range(3):  # decode steps of both lanes
        steps.append([LaneInput([11 + i], 9 + i, 1, pages[0]), LaneInput([17 + i], 6 + i, 2, pages[1])])
    try:
        for lanes in steps:
            before = {name: t.clone() for name, t in pools.items()}
            runner.fn = runner.gm
            want = runner.run(lanes).clone()
            want_pools = {name: t.clone() for name, t in pools.items()}
            for name, t in pools.items():
                t.copy_(before[name])
            runner.fn = direct
            got = runner.run(lanes)
            assert torch.equal(got, want)
            for name, t in pools.items():
                assert torch.equal(t, want_pools[name]), name
    finally:
        runner.fn = direct


def test_direct_calls_keeps_the_graph_unchanged(llm):
    gm = llm.engine.runner.gm
    targets = [n.target for n in gm.graph.nodes]
    direct_calls(gm)
    assert [n.target for n in gm.graph.nodes] == targets
