"""The graph record: what the cached pipeline hands the runtime, in one typed value.

The pipeline on the tiny hybrid model (Mamba2 + sliding-window + full attention) records its caches
with their sizes, its inputs, the page size, token budget and draft bound it was built for and the
backends; the runner takes everything from it and refuses pool sizes that contradict it; no reader
uses a gm.meta key other than the record's; host halves are found by id while their runner lives.
"""

import gc
import re
from pathlib import Path

import pytest
import torch

from autodeploy import backends
from autodeploy.api import DeployConfig
from autodeploy.cache_spec import POOL_FULL, POOL_REPLAY, STEP_INPUTS, swa_pool
from autodeploy.custom_ops.prepare_metadata import swa_ring_pages
from autodeploy.fx_utils import placeholder_names
from autodeploy.graph_record import RECORD_KEY, GraphRecord, graph_record, update_record
from autodeploy.models import build_model
from autodeploy.runtime.engine import Engine
from autodeploy.runtime.pools import PoolSizes
from autodeploy.runtime.runner import GraphRunner
from autodeploy.runtime.speculative import NgramDrafter
from autodeploy.transforms import run_pipeline
from autodeploy.transforms.pipeline import build_cached_graph

ROOT = Path(__file__).resolve().parents[1]
PAGE, TOKENS, SEQ, K = 8, 16, 64, 2


@pytest.fixture(scope="module")
def hybrid():
    """The hybrid zoo model's cached graph for 2 draft tokens, and the config it was built with."""
    model = build_model("hybrid")
    cfg = DeployConfig(max_batch_size=2, max_seq_len=SEQ, max_num_tokens=TOKENS, page_size=PAGE, device="cpu",
                       speculative_config={"method": "ngram", "num_speculative_tokens": K}).completed(model)
    gm, _ = build_cached_graph(model, cfg)
    return model, cfg, gm


def test_the_pipeline_records_caches_inputs_sizes_and_backends(hybrid):
    model, cfg, gm = hybrid
    record = graph_record(gm)
    assert isinstance(record, GraphRecord) and record is gm.meta[RECORD_KEY]
    assert [key for key in gm.meta if key.startswith("autodeploy")] == [RECORD_KEY]  # the one key
    assert record.inputs == tuple(placeholder_names(gm)) and record.raw_inputs == STEP_INPUTS
    assert record.inputs[len(STEP_INPUTS):] == tuple(c.name for c in record.caches)
    assert (record.page_size, record.max_num_tokens, record.max_draft_tokens) == (PAGE, TOKENS, K)
    assert record.max_seq_len == SEQ and record.logit_rows and record.hybrid
    assert record.backends == {"attention": "torch", "ssm": "torch"} and record.host_halves == ()
    window = model.config.sliding_window
    kinds = {(c.kind, c.pool) for c in record.caches}
    assert kinds == {("kv", POOL_FULL), ("kv", swa_pool(window)), ("state", "ssm"), ("state", "conv"),
                     ("state", POOL_REPLAY)}
    for c in record.caches:  # each cache carries its own sizes: a ring its pages, a replay buffer 1 + K rows
        if c.pool == swa_pool(window):
            assert (c.window, c.ring_pages) == (window, swa_ring_pages(window, TOKENS, PAGE))
        elif c.pool == POOL_REPLAY:
            assert c.shape[0] == 1 + K
    with pytest.raises(AttributeError):
        record.page_size = 16  # frozen: passes replace it, nobody edits it


@pytest.mark.parametrize("change, message", [
    (dict(page_size=2 * PAGE), "page_size 16 differs from the graph's 8"),
    (dict(max_num_tokens=2 * TOKENS), "max_num_tokens 32 exceeds the graph's 16"),
    (dict(max_seq_len=2 * SEQ), "max_seq_len 128 exceeds the 64 the graph was exported for"),
])
def test_the_runner_refuses_sizes_that_contradict_the_record(hybrid, change, message):
    gm = hybrid[2]
    sizes = dict(max_batch_size=2, max_seq_len=SEQ, page_size=PAGE, max_num_tokens=TOKENS)
    GraphRunner(gm, PoolSizes(**sizes))  # the sizes it was built for
    GraphRunner(gm, PoolSizes(**{**sizes, "max_num_tokens": TOKENS // 2, "max_seq_len": SEQ // 2}))  # smaller fits
    with pytest.raises(ValueError, match=re.escape(message)):
        GraphRunner(gm, PoolSizes(**{**sizes, **change}))


def test_the_engine_refuses_more_draft_tokens_than_the_graph_holds(hybrid):
    model, _, gm = hybrid
    sizes = PoolSizes(2, SEQ, PAGE, TOKENS)
    vocab = model.config.vocab_size
    Engine(gm, sizes, vocab, drafter=NgramDrafter(K, 1, 4))
    with pytest.raises(ValueError, match=f"{K + 1} draft tokens per step exceed the graph's {K}"):
        Engine(gm, sizes, vocab, drafter=NgramDrafter(K + 1, 1, 4))


def test_the_runner_refuses_a_graph_whose_inputs_are_not_recorded(hybrid):
    _, cfg, _ = hybrid
    gm, _ = build_cached_graph(build_model("hybrid"), cfg)
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        gm.graph.placeholder("stray")
    with pytest.raises(ValueError, match="a pass changed the graph's inputs without recording them"):
        GraphRunner(gm, PoolSizes(2, SEQ, PAGE, TOKENS))
    update_record(gm, inputs=tuple(placeholder_names(gm)))  # recorded, but no step provides it
    with pytest.raises(ValueError, match=r"inputs \['stray'\] that are neither caches nor step inputs"):
        GraphRunner(gm, PoolSizes(2, SEQ, PAGE, TOKENS))


# every access to a GraphModule's meta: subscript, get, setdefault or pop, with the key it uses
GM_META = re.compile(r"\bgm\.meta(?:\[|\.get\(|\.setdefault\(|\.pop\()\s*([^\]\),]+)")


def test_no_reader_uses_a_graph_meta_key_but_the_record():
    """The package, benchmarks, scripts and tests reach a graph's meta only through the record's key."""
    stray = []
    for folder in ("autodeploy", "benchmarks", "scripts", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for key in GM_META.findall(path.read_text(encoding="utf-8")):
                if key.strip() not in ("RECORD_KEY", '"autodeploy"'):
                    stray.append(f"{path.relative_to(ROOT)}: {key.strip()}")
    assert not stray, stray


def test_host_halves_are_found_by_id_while_their_runner_lives(monkeypatch):
    """A backend with a host half (tests/planned_backend.py): the runner builds and registers its
    halves, the op finds them by id; a second runner of the same graph is refused; once the runner
    is dropped the id finds nothing."""
    import planned_backend

    monkeypatch.setitem(backends.CACHED_OPS["attention"], "planned", backends.CachedOp(
        "planned_backend", "planned_cached_attention", host_half="planned_backend:PlannedSteps"))
    from autodeploy import export_model

    gm = export_model(build_model("llama"), max_seq_len=SEQ)
    run_pipeline(gm, ["match_attention", "insert_cached_attention"],
                 {"insert_cached_attention": {"page_size": PAGE, "max_num_tokens": TOKENS, "backend": "planned"}})
    (spec,) = graph_record(gm).host_halves
    assert (spec.family, spec.backend) == ("attention", "planned")
    sizes = PoolSizes(2, SEQ, PAGE, TOKENS)
    runner = GraphRunner(gm, sizes)
    (half,) = runner.host_halves
    assert isinstance(half, planned_backend.PlannedSteps) and backends.host_half(spec.plan_id) is half
    with pytest.raises(ValueError, match="already belongs to another runner"):
        GraphRunner(gm, sizes)
    del runner, half
    gc.collect()
    with pytest.raises(RuntimeError, match=f"no host half {spec.plan_id} is live"):
        backends.host_half(spec.plan_id)
    GraphRunner(gm, sizes)  # a new runner of the graph builds its own


def test_a_graph_without_a_record_gets_one_of_its_inputs():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    record = graph_record(gm)
    assert record.inputs == ("input",) and record.caches == () and record.page_size is None
    assert RECORD_KEY not in gm.meta  # reading does not write
