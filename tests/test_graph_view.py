"""graph_view: the layer-level view, the text summary and the SVG/HTML pictures."""

import xml.etree.ElementTree as ET

import networkx as nx
import pytest

import autodeploy
from autodeploy.graph_view import graph_view, render_svg, summarize, write_views
from autodeploy.models import build_model

SVG_NS = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def hybrid():
    """The embedded hybrid model's engine and its exported (untransformed) graph."""
    llm = autodeploy.LLM(build_model("hybrid"), max_batch_size=4, max_seq_len=128, max_num_tokens=32)
    before = autodeploy.export_model(llm.model, max_seq_len=128)
    return llm, before


def _kinds(view):
    return [(layer.path, layer.kind) for layer in view.layers]


def test_layers_ops_prepares_and_caches_after(hybrid):
    llm, _ = hybrid
    view = graph_view(llm.gm, llm.engine.pools.sizes)
    assert [k for _, k in _kinds(view)] == ["io", "mamba", "mlp", "swa", "mlp", "mamba", "mlp", "full", "mlp", "io"]
    layers = {layer.path: layer for layer in view.layers}
    swa, full = layers["model.layers.2"], layers["model.layers.6"]
    cached = lambda layer: [(o.op, o.window, o.caches) for o in layer.ops if o.caches]  # noqa: E731
    assert cached(swa) == [("torch_cached_attention", 24, ["k_cache_0", "v_cache_0"])]
    assert cached(full) == [("torch_cached_attention", 0, ["k_cache_1", "v_cache_1"])]
    # the fused norms are ops of their layers too (perf transforms are on by default)
    assert {"fused_add_rms_norm", "fused_add_rms_norm_linear"} & {o.op for o in swa.ops}
    assert "W=24" in swa.description and full.description == "full attention"
    mamba = layers["model.layers.4"]
    assert {o.op: o.caches for o in mamba.ops if o.caches} == {"torch_cached_causal_conv1d": ["conv_state_1"],
                                                   "torch_cached_ssd_scan": ["ssm_state_1"]}
    # which prepare node feeds which cached op
    feeds = {(p.op, p.window): {layer.path for layer in view.layers for o in layer.ops if o.node in p.feeds}
             for p in view.prepares}
    assert feeds == {("prepare_attention_metadata", 24): {"model.layers.2"},
                     ("prepare_attention_metadata", 0): {"model.layers.6"},
                     ("prepare_ssm_metadata", None): {"model.layers.0", "model.layers.4"},
                     ("prepare_logit_rows", None): set()}  # it feeds the rows gather before the LM head
    assert all(o.prepare for o in view.ops() if o.caches)
    # cache bytes per pool are the engine's own
    assert view.pool_bytes() == llm.cache_bytes()
    assert view.backends == {"attention": "torch", "ssm": "torch"}


def test_layers_before(hybrid):
    _, before = hybrid
    view = graph_view(before)
    assert [k for _, k in _kinds(view)][1:-1] == ["mamba", "mlp", "swa", "mlp", "mamba", "mlp", "full", "mlp"]
    assert view.op_counts() == {"attention": 2, "ssd_scan": 2, "causal_conv1d": 2}
    assert not view.prepares and not view.caches and all(not o.cached for o in view.ops())


def test_networkx_graph(hybrid):
    llm, _ = hybrid
    g = graph_view(llm.gm, llm.engine.pools.sizes).to_networkx()
    assert nx.is_directed_acyclic_graph(g)
    types = {d["type"] for _, _, d in g.edges(data=True)}
    assert types == {"next", "contains", "feeds", "cache"}
    assert g.nodes["model.layers.2"]["kind"] == "swa"
    assert set(g.predecessors("k_cache_0")) == set() and len(list(g.successors("k_cache_0"))) == 1


def test_summary_names_ops_caches_and_backends(hybrid):
    llm, before = hybrid
    text = summarize(llm, before=before)
    for needle in ("[insert_cached_attention] 2 matches", "[insert_cached_ssm] 4 matches",
                   "attention x2 -> torch_cached_attention x2", "ssd_scan x2 -> torch_cached_ssd_scan x2",
                   "prepare nodes inserted: prepare_ssm_metadata x1, prepare_attention_metadata x2",
                   "sliding-window attention W=24", "full attention", "Mamba2", "W=24: ring of",
                   "kv_swa_24", "kv_full", "ssm_state_0", "conv_state_1", "float32", "total",
                   "max_batch_size=4", "backends: attention=torch, ssm=torch"):
        assert needle in text, needle
    plain = summarize(llm.gm)  # a bare graph: no transform infos, no sizes
    assert "transforms:" not in plain and "per page for kind kv" in plain and "[pages, page_size, 2, 16]" in plain
    with pytest.raises(TypeError):
        summarize(object())


def test_svg_is_well_formed_and_self_contained(hybrid):
    llm, _ = hybrid
    svg = render_svg(graph_view(llm.gm, llm.engine.pools.sizes, title="a <title> & more"), ["sub"])
    root = ET.fromstring(svg)
    assert root.tag == SVG_NS + "svg" and float(root.get("width")) > 500
    ids = {e.get("id") for e in root.iter(SVG_NS + "g")}
    assert {f"model.layers.{i}" for i in range(8)} <= ids
    assert {"k_cache_0", "v_cache_1", "ssm_state_0", "prepare_ssm_metadata_default"} <= ids
    texts = " ".join(t.text or "" for t in root.iter(SVG_NS + "text"))
    assert "a <title> & more" in texts and "torch_cached_ssd_scan" in texts and "W=24" in texts
    assert "href" not in svg and "<image" not in svg  # nothing external


def test_write_views(hybrid, tmp_path):
    llm, _ = hybrid
    paths = write_views(llm, tmp_path / "out", name="hy")
    assert [p.name for p in paths] == ["hy_before.svg", "hy_after.svg", "hy.html", "hy_summary.txt"]
    before, after = (ET.parse(p).getroot() for p in paths[:2])
    before_text = " ".join(t.text or "" for t in before.iter(SVG_NS + "text"))
    after_text = " ".join(t.text or "" for t in after.iter(SVG_NS + "text"))
    assert "model.layers.2" in before_text and "sliding window W=24" in before_text
    assert "torch_cached" not in before_text
    assert "torch_cached_attention" in after_text and "prepare_attention_metadata" in after_text
    assert "k_cache_0" in after_text
    page = paths[2].read_text()
    assert page.count("<svg") == 2 and "insert_cached_ssm" in page
    assert "kv_swa_24" in paths[3].read_text()
    with pytest.raises(TypeError):
        write_views(llm, tmp_path, max_batch_size=2)
    with pytest.raises(FileNotFoundError):
        write_views("no-such-model", tmp_path)


def test_unmatched_attention_before_match_attention():
    """A graph whose attention export did not route (SDPA as exported) shows it as uncached until
    match_attention turns it into the canonical op."""
    from autodeploy.transforms import run_pipeline

    gm = autodeploy.export_model(build_model("llama"), max_seq_len=64, route_attention=False)
    assert {layer.kind for layer in graph_view(gm).layers if not layer.io} == {"unmatched"}
    run_pipeline(gm, ["match_attention"])
    view = graph_view(gm)
    assert {layer.kind for layer in view.layers if not layer.io} == {"full"}
    assert all(layer.description == "full attention + MLP" for layer in view.layers if not layer.io)


def test_checked_mode_range_checks_sit_between_prepare_and_ops():
    from autodeploy.transforms import TRANSFORMS, run_pipeline

    if "insert_index_checks" not in TRANSFORMS:
        pytest.skip("no checked mode in this tree")
    gm = autodeploy.export_model(build_model("hybrid"), max_seq_len=128)
    run_pipeline(gm, ["match_attention", "insert_cached_attention", "insert_cached_ssm", "insert_index_checks"],
                 {"insert_cached_attention": {"max_num_tokens": 16}})  # a ring smaller than the full page list
    view = graph_view(gm)
    assert [layer.kind for layer in view.layers][1:-1] == ["mamba", "mlp", "swa", "mlp", "mamba", "mlp", "full", "mlp"]
    assert sorted(len(p.feeds) for p in view.prepares) == [1, 1, 4] and all(p.checks for p in view.prepares)
    assert "range-checked" in summarize(gm)
