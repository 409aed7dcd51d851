"""Poisoned steps: outputs must not change when everything a step must not read is garbage
(runtime/poison.py), and metadata prepared outside the graph must be caught."""

import operator

import pytest
import torch

from autodeploy import LLM, DeployConfig, SamplingParams
from autodeploy.cache_spec import STEP_INPUTS
from autodeploy.fx_utils import op_nodes
from autodeploy.graph_record import add_input
from autodeploy.models import build_model
from autodeploy.runtime.engine import Engine
from autodeploy.runtime.pools import PoolSizes
from autodeploy.runtime.runner import GraphRunner
from autodeploy.runtime.speculative import NgramDrafter
from autodeploy.transforms.pipeline import build_cached_graph

PREPARE_SSM = torch.ops.autodeploy.prepare_ssm_metadata.default
OPTIONS = dict(max_batch_size=2, max_seq_len=96, max_num_tokens=16, page_size=8)
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


def prompts():
    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 30)]
    return ps + [[5, 6, 7, 8] * 6]  # repetition: the n-gram drafter finds drafts, some accepted


def serve(engine, ps):
    ids = [engine.add_request(p, PARAMS) for p in ps]
    while engine.has_unfinished():
        engine.step()
    engine.pools.assert_empty()
    return [engine.requests.pop(i).output for i in ids]


def test_poisoned_steps_give_the_same_tokens(backend="torch"):
    """The hybrid with a draft model (verify lanes, replay, rings, pages; target and draft engines
    poisoned): the same tokens as unpoisoned. (tests/test_backends.py runs the Triton kernels
    poisoned in the interpreter; tests/test_gpu.py under CUDA graphs.)"""
    model = build_model("hybrid")
    spec = {"method": "draft_model", "model": build_model("hybrid", seed=0), "num_speculative_tokens": 3}
    options = dict(OPTIONS, attn_backend=backend, ssm_backend=backend, speculative_config=spec)
    ps = [{"prompt_token_ids": p} for p in prompts()[:2]]
    params = PARAMS
    ref = [o.outputs[0].token_ids for o in LLM(model, **options).generate(ps, params)]
    llm = LLM(model, **options)
    llm.engine.runner.poison = llm.drafter.runner.poison = True
    assert [o.outputs[0].token_ids for o in llm.generate(ps, params)] == ref
    assert llm.spec_stats.num_accepted_tokens > 0


class SideCallRunner(GraphRunner):
    """The design this project forbids: SSM replay metadata computed by the runtime beside the
    graph and handed to it as inputs."""

    step_inputs = (*STEP_INPUTS, *(f"side_ssm_meta_{i}" for i in range(4)))

    def _args(self, by_name):
        meta = PREPARE_SSM(*(by_name[n] for n in ("input_ids", "seq_lens", "cached_lens", "accepted_lens", "verify")))
        by_name.update({f"side_ssm_meta_{i}": m for i, m in enumerate(meta)})
        return super()._args(by_name)


def hoist_ssm_prepare(gm):
    (prepare,) = op_nodes(gm, PREPARE_SSM)
    for user in list(prepare.users):
        assert user.target is operator.getitem
        user.replace_all_uses_with(add_input(gm, f"side_ssm_meta_{user.args[1]}"))
        gm.graph.erase_node(user)
    gm.graph.erase_node(prepare)
    gm.recompile()


def test_poison_catches_metadata_prepared_outside_the_graph():
    """With the SSM prepare node moved out of the graph into a runtime side call, serving still
    works unpoisoned, but poisoning (which garbles every input that is not a raw fact or a cache)
    breaks it: the test can fail, and fails for exactly that design."""
    model = build_model("hybrid")
    cfg = DeployConfig(**OPTIONS, speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    sizes = PoolSizes(cfg.max_batch_size, cfg.max_seq_len, cfg.page_size, cfg.max_num_tokens)
    ps = prompts()

    def engine(hoisted: bool, poison: bool) -> Engine:
        gm, _ = build_cached_graph(model, cfg)
        if hoisted:
            hoist_ssm_prepare(gm)
        runner = (SideCallRunner if hoisted else GraphRunner)(gm, sizes)
        runner.poison = poison
        return Engine(runner, sizes, 256, drafter=NgramDrafter(3))

    ref = serve(engine(hoisted=False, poison=False), ps)
    assert serve(engine(hoisted=False, poison=True), ps) == ref
    assert serve(engine(hoisted=True, poison=False), ps) == ref  # the side call itself is right...
    with pytest.raises(ValueError, match="replay buffer holds"):  # ...but a path that skips it is not
        serve(engine(hoisted=True, poison=True), ps)
