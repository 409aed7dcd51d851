"""``autodeploy::rms_norm_linear`` / ``fused_add_rms_norm_linear``: the op is rms_norm then linear
exactly (the CPU path), and the one-row Triton kernel matches a float64 computation of the same
casts (interpreter on the CPU at tiny sizes; bf16 on a GPU); ``opcheck`` on both ops."""

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE

pytest.importorskip("triton")

from autodeploy.custom_ops.rms_norm import rms_norm_reference  # noqa: E402
from autodeploy.custom_ops.triton_norm_gemv import triton_norm_gemv  # noqa: E402

ops = torch.ops.autodeploy
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def _want(x, res, nw, offset, cast_first, w, b):
    """float64 of the same steps: the sum rounded to x's dtype, the norm's output rounded to it."""
    total = (x.double() + res.double()).to(x.dtype) if res is not None else x
    normed = rms_norm_reference(total.double(), nw.double(), None, 1e-6, 0, offset, cast_first, torch.float64)
    normed = normed.to(x.dtype).double()
    return normed @ w.double().T + (b.double() if b is not None else 0), total


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("offset,cast_first", [(0.0, True), (1.0, False)])
@pytest.mark.parametrize("k", [64, 100])  # 100: K not a power of two
def test_norm_gemv_matches_float64(dtype, residual, offset, cast_first, k):
    x, nw, w = _rand(1, 1, k, dtype=dtype, seed=1), _rand(k, dtype=dtype, seed=2), _rand(24, k, dtype=dtype, seed=3)
    res = _rand(1, 1, k, dtype=dtype, seed=4) if residual else None
    b = _rand(24, dtype=dtype, seed=5)
    config = {"BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    out, total = triton_norm_gemv(x, res, nw, 1e-6, offset, cast_first, w, b, config=config)
    want, want_total = _want(x, res, nw, offset, cast_first, w, b)
    assert out.shape == (1, 1, 24) and out.dtype == dtype
    assert ((out.double() - want).norm() / want.norm()) < TOL[dtype]
    if residual:
        torch.testing.assert_close(total, want_total, atol=0, rtol=0)
    else:
        assert total is None


def test_ops_are_the_pair_they_replace_and_pass_opcheck():
    x, res, nw = _rand(2, 3, 16, seed=6), _rand(2, 3, 16, seed=7), _rand(16, seed=8)
    w, b = _rand(8, 16, seed=9), _rand(8, seed=10)
    normed = ops.rms_norm(x, nw, None, 1e-6, 0, 0.0, True, torch.float32)  # the ops it replaces, same device
    torch.testing.assert_close(ops.rms_norm_linear(x, nw, 1e-6, 0.0, True, torch.float32, w, b),
                               F.linear(normed, w, b), atol=0, rtol=0)
    out, total = ops.fused_add_rms_norm_linear(x, res, nw, 1e-6, 1.0, False, torch.float32, w, None)
    normed, want_total = ops.fused_add_rms_norm(x, res, nw, 1e-6, 1.0, False, torch.float32)
    torch.testing.assert_close(out, F.linear(normed, w), atol=0, rtol=0)
    torch.testing.assert_close(total, want_total, atol=0, rtol=0)
    torch.library.opcheck(ops.rms_norm_linear.default, (x, nw, 1e-6, 0.0, True, torch.float32, w, b))
    torch.library.opcheck(ops.fused_add_rms_norm_linear.default, (x, res, nw, 1e-6, 1.0, False, torch.float32, w, None))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("casts", [((0.0, True), (0.0, True)), ((1.0, False), (1.0, False)),
                                   ((0.0, False), (1.0, True))])
def test_norm_add_norm_is_the_two_ops(dtype, casts):
    """``rms_norm_add_rms_norm`` (one Triton launch per row on a GPU, here the kernel directly) against
    the two ops it replaces in float64 with the same roundings; on the CPU the op is those ops."""
    from autodeploy.custom_ops.triton_norm_add_norm import triton_norm_add_norm

    (off1, cast1), (off2, cast2) = casts
    x, res = _rand(2, 3, 40, dtype=dtype, seed=11), _rand(2, 3, 40, dtype=dtype, seed=12)
    w1, w2 = _rand(40, dtype=dtype, seed=13), _rand(40, dtype=dtype, seed=14)
    out, total = triton_norm_add_norm(x, w1, 1e-6, off1, cast1, dtype, res, w2, 1e-6, off2, cast2, dtype)
    first = rms_norm_reference(x.double(), w1.double(), None, 1e-6, 0, off1, cast1, torch.float64).to(dtype)
    want_total = (first.double() + res.double()).to(dtype)
    want = rms_norm_reference(want_total.double(), w2.double(), None, 1e-6, 0, off2, cast2, torch.float64)
    torch.testing.assert_close(total, want_total, atol=TOL[dtype], rtol=TOL[dtype])
    assert ((out.double() - want).norm() / want.norm()) < TOL[dtype]
    args = (x.cpu().float(), w1.cpu().float(), 1e-6, off1, cast1, torch.float32, res.cpu().float(), w2.cpu().float(),
            1e-6, off2, cast2, torch.float32)
    got = ops.rms_norm_add_rms_norm(*args)
    mid = ops.rms_norm(args[0], args[1], None, 1e-6, 0, off1, cast1, torch.float32)
    for g, w in zip(got, ops.fused_add_rms_norm(mid, args[6], args[7], 1e-6, off2, cast2, torch.float32)):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    torch.library.opcheck(ops.rms_norm_add_rms_norm.default, args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("token_dim", [1, 2])
@pytest.mark.parametrize("rotary,offset,cast_first", [(16, 1.0, False), (8, 0.0, True)])  # 8 of 16: partial rotary
def test_norm_rope_is_the_norms_then_rope(dtype, token_dim, rotary, offset, cast_first):
    """``rms_norm_rope`` (the Triton kernel, interpreter on the CPU) against rms_norm of q and of k
    then rope in float64 with the same roundings; the op itself on the CPU is those ops exactly."""
    from autodeploy.custom_ops.rope import rope_reference
    from autodeploy.custom_ops.triton_norm_rope import triton_norm_rope

    shape = lambda heads: (1, 5, heads, 16) if token_dim == 1 else (1, heads, 5, 16)  # noqa: E731
    q, k = _rand(*shape(4), dtype=dtype, seed=15), _rand(*shape(2), dtype=dtype, seed=16)
    qw, kw = _rand(16, dtype=dtype, seed=17), _rand(16, dtype=dtype, seed=18)
    pos = torch.tensor([[3, 0, 7, 7, 1]], device=DEVICE)
    angles = torch.arange(9.0)[:, None] * torch.linspace(0.1, 1.0, rotary // 2)[None]
    cos, sin = (f(torch.cat([angles, angles], -1)).to(DEVICE) for f in (torch.cos, torch.sin))
    qo, ko = triton_norm_rope(q, k, qw, kw, 1e-6, offset, cast_first, pos, cos, sin, token_dim)
    norm = lambda x, w: rms_norm_reference(x.double(), w.double(), None, 1e-6, 0, offset, cast_first,  # noqa: E731
                                           torch.float64).to(dtype).double()
    wq, wk = rope_reference(norm(q, qw), norm(k, kw), pos, cos.double(), sin.double(), token_dim)
    for got, want in ((qo, wq), (ko, wk)):
        assert got.is_contiguous() and ((got.double() - want).norm() / want.norm()) < TOL[dtype]
    args = tuple(t.cpu().float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                 for t in (q, k, qw, kw, 1e-6, offset, cast_first, pos.cpu(), cos, sin, token_dim))
    got = ops.rms_norm_rope(*args)
    qn = ops.rms_norm(args[0], args[2], None, 1e-6, 0, offset, cast_first, torch.float32)
    kn = ops.rms_norm(args[1], args[3], None, 1e-6, 0, offset, cast_first, torch.float32)
    for g, w in zip(got, ops.rope(qn, kn, args[7], args[8], args[9], token_dim)):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    torch.library.opcheck(ops.rms_norm_rope.default, args)
