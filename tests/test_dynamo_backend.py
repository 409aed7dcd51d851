"""torch.compile(model, backend="autodeploy"): the zoo compiles to canonical ops and gives eager's logits."""

import importlib.metadata
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from autodeploy import backends
from autodeploy import dynamo_backend as db
from autodeploy.models import build_model
from helpers import attention_layers, expected_windows, hf_logits, mamba_layers

logger = logging.getLogger("autodeploy.dynamo")
LENGTH = 40  # longer than every zoo sliding window (16..24)
ATOL = 1e-4  # float32 logits
# sliding windows: mistral, gemma2, gemma3, hybrid; soft-cap: gemma2; Mamba2: nemotron_h, bamba, mamba2, hybrid
MODELS = ("llama", "mistral", "gemma2", "gemma3", "nemotron_h", "bamba", "mamba2", "hybrid")


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    db.STATS.reset()
    yield
    torch._dynamo.reset()


def _compiled_logits(model, ids, pos, **options):
    compiled = torch.compile(model, backend="autodeploy", options=options)
    with torch.no_grad():
        return compiled(input_ids=ids, position_ids=pos, use_cache=False).logits


def _single_record() -> db.GraphRecord:
    assert db.STATS.num_graphs == 1, f"expected one graph (no graph break), got {db.STATS.graphs}"
    return db.STATS.graphs[0]


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


def test_registered_on_import():
    from torch._dynamo.backends.registry import lookup_backend

    assert "autodeploy" in torch._dynamo.list_backends()
    assert lookup_backend("autodeploy") is db.autodeploy_backend
    db.register()  # idempotent


@pytest.mark.parametrize("import_first", [False, True], ids=["entry-point-only", "import-after-discovery"])
def test_entry_point_discovery(tmp_path, import_first):
    """dynamo finds the backend through a ``torch_dynamo_backends`` entry point (a stand-in
    distribution on sys.path, read by the real importlib.metadata) in a process that never imports
    autodeploy itself, or that imports it after dynamo discovered the entry point: the name must
    not end up registered twice."""
    dist = tmp_path / "autodeploy_entry_point_probe-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: autodeploy-entry-point-probe\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(
        "[torch_dynamo_backends]\nautodeploy = autodeploy.dynamo_backend:autodeploy_backend\n")
    code = textwrap.dedent(f"""
        import sys, torch
        assert "autodeploy" in torch._dynamo.list_backends()  # discovered, not loaded
        assert "autodeploy" not in sys.modules
        if {import_first}:
            import autodeploy.dynamo_backend
        f = torch.compile(lambda x: x * 2 + 1, backend="autodeploy", options={{"inductor": False}})
        assert f(torch.ones(3)).tolist() == [3.0, 3.0, 3.0]
        import autodeploy.dynamo_backend as db
        assert db.STATS.num_graphs == 1, db.STATS
        print("OK")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]


def test_installed_entry_point():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    if "autodeploy" not in eps.names:
        pytest.skip("the installed autodeploy distribution declares no torch_dynamo_backends entry point: add "
                    "[project.entry-points.torch_dynamo_backends] autodeploy = "
                    "\"autodeploy.dynamo_backend:autodeploy_backend\" to pyproject.toml and reinstall")
    assert eps["autodeploy"].load() is db.autodeploy_backend


def test_unknown_option_is_an_error():
    f = torch.compile(lambda x: x + 1, backend="autodeploy", options={"inductr": False})
    with pytest.raises(Exception, match="unknown option"):
        f(torch.ones(2))


# ----------------------------------------------------------------------------------------------
# The zoo, eager (inductor off): matched ops and logits
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_zoo_matches_and_equals_eager(name):
    model = build_model(name)
    ids, pos, ref = hf_logits(model, LENGTH)
    db.prepare(model)  # routes Mamba2 mixers; a no-op for attention-only models
    got = _compiled_logits(model, ids, pos, inductor=False)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    rec = _single_record()
    logger.info("%s: %s", name, rec.summary())
    assert not rec.unmatched, rec.unmatched
    assert rec.matched["attention"] == attention_layers(model)
    assert rec.matched["ssd_scan"] == rec.matched["causal_conv1d"] == mamba_layers(model)
    assert rec.unrouted_ssm == 0
    assert rec.windows == expected_windows(model)
    soft_cap = getattr(model.config, "attn_logit_softcapping", None) or 0.0
    assert rec.soft_caps == [soft_cap] * attention_layers(model)
    # SDPA wherever it can express the attention, the reference for soft-caps
    assert rec.implementations["sdpa"] == (0 if soft_cap else attention_layers(model))
    assert rec.implementations["ssd_scan_reference"] == mamba_layers(model)


def test_unprepared_mamba_stays_traced_and_is_reported():
    model = build_model("nemotron_h")
    ids, pos, ref = hf_logits(model, LENGTH)
    torch.testing.assert_close(_compiled_logits(model, ids, pos, inductor=False), ref, atol=ATOL, rtol=0)
    rec = _single_record()
    assert rec.matched == {"attention": 1}
    assert rec.unrouted_ssm == mamba_layers(model) == 2
    assert "prepare(model)" in rec.summary()


def test_prepare_and_unprepare():
    llama = build_model("llama")
    assert db.prepare(llama) is llama and "forward" not in vars(llama)  # nothing to route
    model = build_model("mamba2")
    bound = model.forward
    assert db.prepare(model) is model and "forward" in vars(model)
    db.prepare(model)  # idempotent
    db.unprepare(model)
    assert "forward" not in vars(model) and model.forward == bound


# ----------------------------------------------------------------------------------------------
# Graph breaks
# ----------------------------------------------------------------------------------------------


def test_explain_reports_no_graph_breaks():
    report = {}
    for name in MODELS:
        model = db.prepare(build_model(name))
        ids, pos = torch.randint(0, 256, (1, LENGTH)), torch.arange(LENGTH)[None]
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(input_ids=ids, position_ids=pos, use_cache=False)
        report[name] = (explained.graph_count, explained.graph_break_count,
                        [str(r.reason).splitlines()[0] for r in explained.break_reasons])
        logger.info("explain %s: %d graph(s), %d break(s) %s", name, *report[name])
    assert all(breaks == 0 for _, breaks, _ in report.values()), report


# ----------------------------------------------------------------------------------------------
# Inductor, dynamic shapes, masks that must not be matched
# ----------------------------------------------------------------------------------------------


def test_inductor_on_cpu():
    model = db.prepare(build_model("hybrid"))
    ids, pos, ref = hf_logits(model, LENGTH)
    got = _compiled_logits(model, ids, pos)  # default options: inductor on
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    rec = _single_record()
    assert rec.inductor and rec.matched == {"attention": 2, "ssd_scan": 2, "causal_conv1d": 2}
    assert rec.windows == [24, 0]


def test_dynamic_lengths_probe_and_guard():
    """A dynamic-length graph probes its masks up to ``probe_length`` (a power of two past the
    current length) and guards on it: a longer input recompiles and is probed again."""
    model = build_model("mistral")  # window 24
    compiled = torch.compile(model, backend="autodeploy", options={"inductor": False, "probe_length": 32})
    for length, graphs, windows in ((20, 1, [0, 0]), (30, 2, [24, 24]), (50, 3, [24, 24])):
        ids, pos, ref = hf_logits(model, length, seed=length)
        with torch.no_grad():
            got = compiled(input_ids=ids, position_ids=pos, use_cache=False).logits
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
        assert db.STATS.num_graphs == graphs, db.STATS.graphs
        rec = db.STATS.graphs[-1]
        assert rec.windows == windows  # at 20 tokens a window of 24 is full causal attention
        assert rec.dynamic == (graphs > 1)


def test_masks_read_off_inputs():
    """Packed position ids fail loudly; a padding-mask input keeps its attention unmatched."""
    model = build_model("llama")
    compiled = torch.compile(model, backend="autodeploy", options={"inductor": False})
    ids, pos, ref = hf_logits(model, LENGTH)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids, position_ids=pos + 7, use_cache=False).logits,
                                   model(input_ids=ids, position_ids=pos + 7, use_cache=False).logits,
                                   atol=ATOL, rtol=0)
        packed = torch.cat([torch.arange(LENGTH // 2), torch.arange(LENGTH // 2)])[None]
        with pytest.raises(RuntimeError, match="not one contiguous run"):
            compiled(input_ids=ids, position_ids=packed, use_cache=False)
        mask = torch.ones_like(ids)
        got = compiled(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    rec = db.STATS.graphs[-1]
    assert rec.matched["attention"] == 0 and len(rec.unmatched) == 2
    assert all("attention_mask" in line for line in rec.unmatched), rec.unmatched


# ----------------------------------------------------------------------------------------------
# Triton SSM kernels (interpreted on the CPU)
# ----------------------------------------------------------------------------------------------

needs_triton = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton needs a GPU or TRITON_INTERPRET=1 (set by conftest on CPU-only machines)")


@needs_triton
def test_triton_ssm_wrappers_match_references():
    from autodeploy.custom_ops.causal_conv1d import causal_conv1d_reference
    from autodeploy.custom_ops.ssd_scan import ssd_scan_reference

    g = torch.Generator().manual_seed(0)
    b, s, h, p, groups, n = 2, 37, 4, 16, 2, 16
    x, dt = torch.randn(b, s, h, p, generator=g), torch.randn(b, s, h, generator=g)
    A, D, bias = -torch.rand(h, generator=g) - 0.5, torch.randn(h, generator=g), torch.randn(h, generator=g)
    B, C = torch.randn(b, s, groups, n, generator=g), torch.randn(b, s, groups, n, generator=g)
    for initial in (None, torch.randn(b, h, p, n, generator=g)):
        args = (x, dt, A, B, C, D, bias, initial, True, 0.0, float("inf"), 16)
        for got, want in zip(db.triton_ssd_scan(*args), ssd_scan_reference(*args)):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    xc, w, wb = torch.randn(b, 24, s, generator=g), torch.randn(24, 4, generator=g), torch.randn(24, generator=g)
    for activation in ("", "silu"):
        torch.testing.assert_close(db.triton_causal_conv1d(xc, w, wb, activation),
                                   causal_conv1d_reference(xc, w, wb, activation), atol=1e-5, rtol=1e-5)


@needs_triton
def test_mamba2_on_triton_kernels():
    model = build_model("mamba2")
    ids, pos, ref = hf_logits(model, LENGTH)
    got = _compiled_logits(db.prepare(model), ids, pos, inductor=False, ssm_backend="triton")
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert _single_record().implementations == {"triton_ssd_scan": 2, "triton_causal_conv1d": 2}


@needs_triton
def test_a_flashinfer_ssm_choice_lowers_to_the_triton_kernels(monkeypatch):
    """Where the flashinfer SSM backend is chosen (the lowering once fell back to the torch
    reference ops for it), the uncached graph gets the Triton kernels, which flashinfer's SSM
    backend also runs for every non-decode lane."""
    monkeypatch.setattr(backends, "resolve", lambda *args, **kwargs: "flashinfer")
    model = build_model("mamba2")
    ids, pos, ref = hf_logits(model, LENGTH)
    got = _compiled_logits(db.prepare(model), ids, pos, inductor=False)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert _single_record().implementations == {"triton_ssd_scan": 2, "triton_causal_conv1d": 2}
