"""The performance transforms, one at a time and all together, on every zoo model: what each
matched (as many as the model has layers with the pattern, nothing left over) and the logits
against the untransformed graph (float32)."""

import pytest
import torch

from autodeploy import export_model
from autodeploy.models import build_model, zoo_names
from autodeploy.transforms import run_pipeline
from helpers import attention_layers, op_counts

aten = torch.ops.aten
ops = torch.ops.autodeploy
ATOL = 1e-5  # float32; the fused ops repeat transformers' arithmetic
LENGTH = 29


def _exported(name, dtype=torch.float32):
    model = build_model(name, dtype=dtype)
    gm = export_model(model, max_seq_len=64)
    ids = torch.randint(0, model.config.vocab_size, (1, LENGTH), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(LENGTH)[None]
    with torch.no_grad():
        ref = gm(ids, pos)[0]
    return model, gm, ids, pos, ref


def _check_logits(gm, ids, pos, ref):
    with torch.no_grad():
        got = gm(ids, pos)[0]
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=ATOL)


def _modules(model, suffix):
    return sum(type(m).__name__.endswith(suffix) for m in model.modules())


def _uses_rope(model) -> bool:
    return any("rotary" in name for name, _ in model.named_modules())


@pytest.mark.parametrize("name", zoo_names())
def test_match_rope(name):
    model, gm, ids, pos, ref = _exported(name)
    info = run_pipeline(gm, ["match_attention", "match_rope"])[1]
    counts = op_counts(gm)
    expected = attention_layers(model) if _uses_rope(model) else 0
    assert info.num_matches == counts[ops.rope.default] == expected
    assert info.details["unmatched"] == 0
    assert counts[aten.cos.default] == counts[aten.sin.default] == 0  # the per-step cos/sin are gone
    _check_logits(gm, ids, pos, ref)


@pytest.mark.parametrize("name", zoo_names())
def test_match_rms_norm(name):
    model, gm, ids, pos, ref = _exported(name)
    norms = _modules(model, "RMSNorm") + _modules(model, "RMSNormGated") - _modules(model, "RMSNormGatedGated")
    info = run_pipeline(gm, ["match_attention", "match_rms_norm"])[1]
    counts = op_counts(gm)
    assert info.num_matches == counts[ops.rms_norm.default] + counts[ops.fused_add_rms_norm.default] == norms
    assert info.details["unmatched_rsqrt"] == 0 and counts[aten.rsqrt.default] == 0
    assert counts[ops.fused_add_rms_norm.default] > 0  # every zoo model has residual adds before norms
    _check_logits(gm, ids, pos, ref)


def _linears_sharing_an_input(gm):
    readers = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == aten.linear.default:
            readers.setdefault(n.args[0], []).append(n)
    return [v for v in readers.values() if len(v) > 1]


@pytest.mark.parametrize("name", zoo_names())
def test_fuse_projections(name):
    model, gm, ids, pos, ref = _exported(name)
    gated_mlps = sum(hasattr(m, "gate_proj") and hasattr(m, "up_proj") for m in model.modules())
    params_before = sum(p.numel() for p in gm.parameters())
    linears_before = op_counts(gm)[aten.linear.default]
    info = run_pipeline(gm, ["match_attention", "fuse_projections"])[1]
    assert info.num_matches == attention_layers(model) + gated_mlps
    assert not _linears_sharing_an_input(gm)
    assert op_counts(gm)[aten.linear.default] == linears_before - sum(n - 1 for n in info.details["fused"])
    assert sum(p.numel() for p in gm.parameters()) == params_before  # concatenated, not copied
    _check_logits(gm, ids, pos, ref)


@pytest.mark.parametrize("name", zoo_names())
def test_match_gated_activation(name):
    model, gm, ids, pos, ref = _exported(name)
    gated_mlps = sum(hasattr(m, "gate_proj") and hasattr(m, "up_proj") for m in model.modules())
    relu2_mlps = sum(type(m).__name__ == "ReLUSquaredActivation" for m in model.modules())
    infos = run_pipeline(gm, ["match_attention", "match_rms_norm", "match_gated_activation"])
    counts = op_counts(gm)
    assert infos[2].num_matches == counts[ops.gated_activation.default] == gated_mlps + relu2_mlps
    assert counts[aten.silu.default] == counts[aten.gelu.default] == counts[aten.relu.default] == 0
    _check_logits(gm, ids, pos, ref)


@pytest.mark.parametrize("name", zoo_names())
def test_fold_constants(name):
    model, gm, ids, pos, ref = _exported(name)
    info = run_pipeline(gm, ["match_attention", "fold_constants"])[1]
    counts = op_counts(gm)
    # a Mamba2 mixer's A = -exp(A_log.float()) is computed once, not every step
    assert counts[aten.exp.default] == 0
    mixers = sum(hasattr(m, "A_log") for m in model.modules())
    assert info.num_matches >= mixers
    # nothing left that reads weights alone (small enough to fold)
    consts = {n for n in gm.graph.nodes if n.op == "get_attr"}
    leftover = [n for n in gm.graph.nodes if n.op == "call_function" and n.all_input_nodes
                and all(i in consts for i in n.all_input_nodes) and n.meta["val"].numel() <= 1 << 20
                and isinstance(n.target, torch._ops.OpOverload)]
    assert not leftover, leftover
    _check_logits(gm, ids, pos, ref)


def test_fold_constants_keeps_big_copies_out():
    model, gm, ids, pos, ref = _exported("llama")
    emb = next(n for n in gm.graph.nodes if n.op == "get_attr" and "embed" in n.target)
    with gm.graph.inserting_after(emb):  # a float64 copy of the embedding: bigger than the limit set below
        big = gm.graph.call_function(aten._to_copy.default, (emb,), {"dtype": torch.float64})
    with gm.graph.inserting_after(big):
        total = gm.graph.call_function(aten.sum.default, (big,))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        plus = gm.graph.call_function(aten.add.Tensor, (out.args[0], total))
    big.meta["val"], total.meta["val"] = torch.empty(0), torch.empty(())
    out.args = (plus,)
    gm.recompile()
    with torch.no_grad():
        want = gm(ids, pos)
    buffers = {name for name, _ in gm.named_buffers()}
    run_pipeline(gm, ["fold_constants"], {"fold_constants": {"max_elements": 100}})
    # the big copy stays a step-time op (and so does the sum computed from it); no big buffer appears
    assert any(n.target == aten._to_copy.default for n in gm.graph.nodes)
    assert all(b.numel() <= 100 for name, b in gm.named_buffers() if name not in buffers)
    with torch.no_grad():
        torch.testing.assert_close(gm(ids, pos), want)


@pytest.mark.parametrize("name", ["llama", "gemma2", "hybrid"])
def test_all_perf_transforms_then_fewer_nodes(name):
    model, gm, ids, pos, ref = _exported(name)
    before = len(gm.graph.nodes)
    run_pipeline(gm, ["match_attention", "match_rope", "match_rms_norm", "fuse_projections", "match_gated_activation",
                      "fold_constants"])
    assert len(gm.graph.nodes) < 0.75 * before
    _check_logits(gm, ids, pos, ref)


def test_fused_weights_are_not_a_second_copy():
    """The model's own q/k/v and gate/up weights become views of the fused tensors (the model still
    computes the same logits), so fusing adds no weight memory."""
    model, gm, ids, pos, ref = _exported("llama")
    run_pipeline(gm, ["match_attention", "fuse_projections"])
    attn = model.model.layers[0].self_attn
    fused = next(t for name, t in gm.named_parameters() if name.startswith("fused_projection"))
    base = fused.untyped_storage().data_ptr()
    assert all(lin.weight.untyped_storage().data_ptr() == base for lin in (attn.q_proj, attn.k_proj, attn.v_proj))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, position_ids=pos, use_cache=False).logits[0], ref,
                                   atol=ATOL, rtol=ATOL)


def test_fuse_projections_keeps_tied_weights():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 4, bias=False)

        def forward(self, x):
            return self.a(x) + torch.nn.functional.linear(self.a(x), self.a.weight) + self.b(x).sum()

    gm = torch.export.export(Tied(), (torch.randn(3, 8),)).module()
    x = torch.randn(3, 8)
    ref = gm(x)
    run_pipeline(gm, ["fuse_projections"])
    torch.testing.assert_close(gm(x), ref)


@pytest.mark.parametrize("name", ["llama", "nemotron_h", "gemma3"])
def test_match_rms_norm_bfloat16_is_exact(name):
    """In bf16 transformers casts the residual stream to the norm's dtype (a no-op cast) between the
    residual add and the norm; the residual add is still fused, and the torch implementation repeats
    eager's casts exactly (logits bit-identical)."""
    _, gm, ids, pos, ref = _exported(name, torch.bfloat16)
    with torch.no_grad():
        info = run_pipeline(gm, ["match_attention", "match_rms_norm"])[1]
        assert info.details["fused_residual"] > 0 and info.details["unmatched_rsqrt"] == 0
        assert torch.equal(gm(ids, pos)[0], ref)
    # NemotronH's mixer upcasts its scan output before the gated norm: the op takes it uncast
    norms = [n for n in gm.graph.nodes if n.target == torch.ops.autodeploy.rms_norm.default]
    assert all(n.args[0].meta["val"].dtype == torch.bfloat16 for n in norms), name

