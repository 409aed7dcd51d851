"""gather_logits: the LM head runs on the used rows only; their logits equal the full graph's."""

import pytest
import torch

from autodeploy import LLM
from autodeploy.graph_record import graph_record
from autodeploy.models import build_model
from autodeploy.runtime.batch import LaneInput

aten = torch.ops.aten
OPTIONS = dict(max_batch_size=3, max_seq_len=96, max_num_tokens=64)


def _lanes():
    g = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(0, 256, (n,), generator=g).tolist()  # noqa: E731
    # a 40-token prefill, a decode at position 17, a verify lane of 1 + 2 drafts at position 9
    return [LaneInput(tokens(40), 0, 1, [1, 2, 3]), LaneInput(tokens(1), 17, 2, [4, 5]),
            LaneInput(tokens(3), 9, 3, [6], verify=True)]


@pytest.mark.parametrize("name", ["llama", "gemma2", "hybrid"])
def test_rows_equal_the_full_graphs_rows(name):
    spec = {"method": "ngram", "num_speculative_tokens": 2}
    model = build_model(name)
    gathered = LLM(model, speculative_config=spec, **OPTIONS)
    full = LLM(model, speculative_config=spec, perf_transforms={"gather_logits": False}, **OPTIONS)
    lm_head = [n for n in gathered.gm.graph.nodes if n.target == aten.index_select.default]
    assert len(lm_head) == 1 and graph_record(gathered.gm).logit_rows
    assert not graph_record(full.gm).logit_rows
    # the prefill lane's rows: 40 tokens in, 1 + 1 + 3 rows of logits out
    rows = gathered.engine.runner.run(_lanes())
    assert rows.shape == (5, model.config.vocab_size)
    torch.testing.assert_close(rows, full.engine.runner.run(_lanes()), atol=1e-5, rtol=1e-5)


def test_prefill_never_materialises_all_rows():
    llm = LLM(build_model("llama"), **OPTIONS)
    runner = llm.engine.runner
    args = runner._args(runner.inputs.fill([LaneInput(list(range(60)), 0, 1, [1, 2, 3, 4])]))
    with torch.no_grad():
        out = runner.fn(*args)
    # the LM head ran on min(T, lanes) rows: 4 lanes (3 + the padding lane) for 60 tokens
    assert out.shape[:2] == (1, OPTIONS["max_batch_size"] + 1)


def test_gather_sits_before_the_final_norm():
    llm = LLM(build_model("llama"), **OPTIONS)
    gather = next(n for n in llm.gm.graph.nodes if n.target == aten.index_select.default)
    assert [u.target for u in gather.users] == [torch.ops.autodeploy.rms_norm.default]


def test_all_transforms_off_matches_all_on():
    model = build_model("gemma3")
    prompts = [{"prompt_token_ids": list(range(5, 45))}, {"prompt_token_ids": [7, 8, 9]}]
    from autodeploy import SamplingParams

    params = SamplingParams(max_tokens=12)
    on = LLM(model, **OPTIONS).generate(prompts, params)
    from autodeploy.transforms.pipeline import PERF_TRANSFORMS

    off = LLM(model, perf_transforms={n: False for n in PERF_TRANSFORMS}, **OPTIONS).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in on] == [o.outputs[0].token_ids for o in off]


def test_bad_perf_transform_name():
    with pytest.raises(ValueError, match="perf_transforms"):
        LLM(build_model("llama"), perf_transforms={"fuse_everything": True}, **OPTIONS)


def test_host_rows_equal_the_graphs_prepare_logit_rows():
    """The engine's row rule (runtime.batch.logit_rows) and the graph's (prepare_logit_rows) are one
    rule written twice, on the host and on the device: they pick the same rows for random lanes."""
    from autodeploy.custom_ops.prepare_metadata import prepare_logit_rows
    from autodeploy.runtime.batch import logit_rows

    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        num = int(torch.randint(1, 7, (), generator=g))
        lens = torch.randint(0, 6, (num,), generator=g).tolist()
        verify = (torch.rand(num, generator=g) < 0.4).tolist()
        lanes = [LaneInput([1] * n, 0, 1 + i, [1], verify=v) for i, (n, v) in enumerate(zip(lens, verify))]
        total = max(sum(lens), 1)
        want = logit_rows(lanes)
        got = prepare_logit_rows(torch.zeros(1, total, dtype=torch.long), torch.tensor(lens, dtype=torch.int32),
                                 torch.tensor(verify), 1 + max(lens))
        assert got[:len(want)].tolist() == want, (lens, verify)
