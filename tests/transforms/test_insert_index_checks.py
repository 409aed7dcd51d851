"""insert_index_checks (checked mode): graph shape, unchanged numbers, and caught corruption."""

import pytest
import torch

from autodeploy import LLM, SamplingParams
from autodeploy.fx_utils import op_kwargs
from autodeploy.models import build_model
from helpers import op_counts

CHECK_ATTENTION = torch.ops.autodeploy.check_attention_metadata.default
CHECK_SSM = torch.ops.autodeploy.check_ssm_metadata.default
OPTIONS = dict(max_batch_size=2, max_seq_len=64, max_num_tokens=16, page_size=8)
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return build_model("hybrid")


def test_one_check_per_pool_and_the_same_tokens(model):
    plain = LLM(model, **OPTIONS, speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    checked = LLM(model, **OPTIONS, checked=True, speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    counts = op_counts(checked.gm)
    assert counts[CHECK_ATTENTION] == 2  # the full pool and the window-24 rings
    assert counts[CHECK_SSM] == 1
    cached_ops = [n for n in checked.gm.graph.nodes if n.op == "call_function" and "_cached_" in str(n.target)]
    assert len(cached_ops) == 6  # 2 attention + 2 scans + 2 convs
    for node in cached_ops:  # every cached op now reads its indices through a check
        index_arg = op_kwargs(node).get("write_idx", op_kwargs(node).get("slots"))
        assert index_arg.args[0].target in (CHECK_ATTENTION, CHECK_SSM), node
    ps = [{"prompt_token_ids": [3, 1, 4, 1, 5, 9, 2, 6] * 3}, {"prompt_token_ids": [7] * 40}]
    assert ([o.outputs[0].token_ids for o in checked.generate(ps, PARAMS)]
            == [o.outputs[0].token_ids for o in plain.generate(ps, PARAMS)])


@pytest.mark.parametrize("checked", [True, False])
@pytest.mark.parametrize("corrupt", ["page", "slot"])
def test_a_corrupted_index_is_caught_never_clamped(model, checked, corrupt):
    """Checked mode names the bad index; without it the out-of-range index is still an error
    (the torch backend indexes exactly), never a silent clamp that reads another sequence."""
    llm = LLM(model, **OPTIONS, checked=checked)
    engine = llm.engine
    rid = engine.add_request(list(range(1, 12)), PARAMS)
    engine.step()
    req = engine.requests[rid]
    if corrupt == "page":
        req.pages[0] = engine.sizes.num_full_pages + 40
        match = "checked mode: kv_full: a page index is outside the pool" if checked else "out of (range|bounds)"
    else:
        req.slot = engine.sizes.max_batch_size + 7
        match = "checked mode: a sequence slot is outside the state cache" if checked else "out of (range|bounds)"
    with pytest.raises((RuntimeError, IndexError), match=match):
        engine.step()


def test_accounting_check_catches_a_leaked_page(model):
    llm = LLM(model, **OPTIONS, checked=True)
    engine = llm.engine
    engine.add_request([1, 2, 3], PARAMS)
    engine.step()
    engine.pools.pages.allocate(1)  # allocated but owned by no request
    with pytest.raises(AssertionError, match="pages of running requests"):
        engine.step()


def test_rope_positions_are_checked():
    """A position past the rope tables is named in checked mode (the tables cover max(max_seq_len,
    max_num_tokens) positions; the engine never goes past them, a direct caller could)."""
    llm = LLM(build_model("llama"), **OPTIONS, checked=True)
    counts = op_counts(llm.gm)
    assert counts[torch.ops.autodeploy.check_positions.default] == 1  # both layers share one table
    runner = llm.engine.runner
    from autodeploy.runtime.batch import LaneInput

    args = runner._args(runner.inputs.fill([LaneInput([5, 6], 3, 1, [1])]))
    names = runner.input_names
    args[names.index("position_ids")] = torch.tensor([[3, OPTIONS["max_seq_len"] + 5]])
    with pytest.raises(RuntimeError, match="checked mode: a position is outside the rope tables"):
        runner.gm(*args)
