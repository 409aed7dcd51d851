"""The fused small ops (rms_norm, fused_add_rms_norm, gated_activation, rope): their torch
implementation against a plain float64 computation, and their Triton kernels against the torch
implementation (interpreter on the CPU, tiny sizes; the GPU run covers bf16)."""

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE

pytest.importorskip("triton")

from autodeploy.custom_ops.prepare_metadata import prepare_logit_rows  # noqa: E402
from autodeploy.custom_ops.rms_norm import rms_norm_reference  # noqa: E402
from autodeploy.custom_ops.triton_gated_activation import triton_gated_activation  # noqa: E402
from autodeploy.custom_ops.triton_rms_norm import triton_fused_add_rms_norm, triton_rms_norm  # noqa: E402
from autodeploy.custom_ops.triton_rope import triton_rope  # noqa: E402

ops = torch.ops.autodeploy
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("group_size", [0, 8])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("weight_offset,cast_first", [(0.0, True), (0.0, False), (1.0, False)])
def test_rms_norm_reference_is_the_formula(group_size, gated, weight_offset, cast_first):
    x, gate, w = _rand(1, 5, 32, seed=1).cpu(), _rand(1, 5, 32, seed=2).cpu(), _rand(32, seed=3).cpu()
    got = rms_norm_reference(x, w, gate if gated else None, 1e-6, group_size, weight_offset, cast_first, torch.float32)
    xd = x.double() * (F.silu(gate.double()) if gated else 1)
    xg = xd.view(1, 5, -1, group_size or 32)
    y = (xg / torch.sqrt(xg.pow(2).mean(-1, keepdim=True) + 1e-6)).view(1, 5, 32)
    want = y * (w.double() + weight_offset)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size,gated,weight_offset,cast_first",
                         [(0, False, 0.0, True), (0, False, 1.0, False), (16, True, 0.0, True), (0, True, 0.0, False)])
def test_triton_rms_norm(dtype, group_size, gated, weight_offset, cast_first):
    x = _rand(1, 7, 48, dtype=dtype, seed=4)[..., :32]  # strided rows: the kernel copies them first
    gate = _rand(1, 7, 32, dtype=dtype, seed=5) if gated else None
    w = _rand(32, dtype=dtype, seed=6)
    want = rms_norm_reference(x, w, gate, 1e-5, group_size, weight_offset, cast_first, dtype)
    got = triton_rms_norm(x, w, gate, 1e-5, group_size, weight_offset, cast_first, dtype)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_fused_add_rms_norm(dtype):
    x, res = _rand(1, 6, 40, dtype=dtype, seed=7), _rand(1, 6, 40, dtype=dtype, seed=8)
    w = _rand(40, dtype=dtype, seed=9)
    want_norm, want_sum = ops.fused_add_rms_norm(x.cpu(), res.cpu(), w.cpu(), 1e-6, 1.0, False, dtype)
    got_norm, got_sum = triton_fused_add_rms_norm(x, res, w, 1e-6, 1.0, False, dtype)
    torch.testing.assert_close(got_sum.cpu(), want_sum, atol=0, rtol=0)  # one add, same rounding
    torch.testing.assert_close(got_norm.cpu().float(), want_norm.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation,gated", [("silu", True), ("gelu", True), ("gelu_tanh", True), ("relu2", False),
                                              ("relu2", True)])
def test_triton_gated_activation(dtype, activation, gated):
    fused = _rand(1, 5, 2 * 24, dtype=dtype, seed=10)
    gate, up = fused.split([24, 24], -1)  # column slices of one GEMM output: strided rows
    up = up if gated else None
    want = ops.gated_activation(gate.cpu(), up.cpu() if gated else None, activation)
    got = triton_gated_activation(gate, up, activation)
    torch.testing.assert_close(got.cpu().float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,rotary_dim", [("heads_first", 16), ("tokens_first", 16), ("heads_first", 8)])
def test_triton_rope(dtype, layout, rotary_dim):
    T, hq, hk, d = 6, 4, 2, 16
    token_dim = 2 if layout == "heads_first" else 1
    q = _rand(1, T, hq, d, dtype=dtype, seed=11)
    k = _rand(1, T, hk, d, dtype=dtype, seed=12)
    if layout == "heads_first":  # the transposed view transformers rotates
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    inv = 1.0 / 100 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    angles = torch.arange(40).float()[:, None] * inv[None]
    cos = torch.cat([angles, angles], -1).cos().to(device=DEVICE, dtype=dtype)
    sin = torch.cat([angles, angles], -1).sin().to(device=DEVICE, dtype=dtype)
    pos = torch.tensor([[3, 4, 5, 0, 1, 39]], device=DEVICE)
    want_q, want_k = ops.rope(q.cpu(), k.cpu(), pos.cpu(), cos.cpu(), sin.cpu(), token_dim)
    got_q, got_k = triton_rope(q, k, pos, cos, sin, token_dim)
    for got, want in ((got_q, want_q), (got_k, want_k)):
        assert got.shape == want.shape
        torch.testing.assert_close(got.cpu().float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    # position 0 leaves a vector unchanged: a check on the reference itself
    torch.testing.assert_close(want_q.select(token_dim, 3), q.cpu().select(token_dim, 3))


def test_prepare_logit_rows():
    # lanes: prefill of 4, decode, verify of 3, empty, padding lane of 2 tokens
    seq_lens = torch.tensor([4, 1, 3, 0, 2], dtype=torch.int32)
    verify = torch.tensor([False, False, True, False, False])
    ids = torch.zeros(1, 10, dtype=torch.long)
    rows = prepare_logit_rows(ids, seq_lens, verify, 3)
    # last of lane 0 (3), lane 1 (4), all of lane 2 (5, 6, 7), padding lane's last (9), then padding rows
    assert rows.tolist() == [3, 4, 5, 6, 7, 9, 0, 0, 0, 0]
    assert prepare_logit_rows(ids[:, :4], torch.tensor([1, 1, 1, 1], dtype=torch.int32),
                              torch.zeros(4, dtype=torch.bool), 1).tolist() == [0, 1, 2, 3]


def test_triton_logit_rows_matches_torch():
    from autodeploy.custom_ops.triton_logit_rows import triton_logit_rows

    g = torch.Generator().manual_seed(7)
    for trial in range(12):
        lanes = int(torch.randint(1, 9, (1,), generator=g))
        seq_lens = torch.randint(0, 6, (lanes,), generator=g).int()
        verify = torch.rand(lanes, generator=g) < 0.4
        T = max(int(seq_lens.sum()), 1)
        seq_lens[-1] += T - int(seq_lens.sum())
        per_lane = 1 + int(seq_lens.max())
        ids = torch.zeros(1, T, dtype=torch.long)
        want = prepare_logit_rows(ids, seq_lens, verify, per_lane if trial % 3 else 1)
        got = triton_logit_rows(seq_lens.to(DEVICE), verify.to(DEVICE), want.shape[0])
        assert got.cpu().tolist() == want.tolist(), (seq_lens.tolist(), verify.tolist())
