"""``autodeploy::linear`` and its one-row Triton kernel: the kernel against a float64 matmul
(interpreter on the CPU at tiny sizes; bf16 on a GPU), the op's dispatch, and ``opcheck``."""

import pytest
import torch

from helpers import DEVICE

pytest.importorskip("triton")

from autodeploy.custom_ops.linear import _use_gemv  # noqa: E402
from autodeploy.custom_ops.triton_gemv import triton_gemv  # noqa: E402

DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(40, 64), (33, 100)])  # 33 x 100: ragged in N and K
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("config", [None, {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}])
def test_gemv_matches_float64(dtype, n, k, bias, config):
    x, w = _rand(1, 1, k, dtype=dtype, seed=1), _rand(n, k, dtype=dtype, seed=2)
    b = _rand(n, dtype=dtype, seed=3) if bias else None
    got = triton_gemv(x, w, b, config=config)
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    assert got.shape == (1, 1, n) and got.dtype == dtype
    err = (got.double() - want).norm() / want.norm()
    assert err < TOL[dtype], err


def test_gemv_reads_a_strided_row():
    """A strided row (a column slice of a wider tensor) gives the same result as its copy."""
    wide, w = _rand(96, 2, seed=4), _rand(24, 96, seed=5)
    x = wide[:, 0]
    torch.testing.assert_close(triton_gemv(x, w), triton_gemv(x.contiguous(), w))


def test_gemv_refuses_more_than_one_row():
    with pytest.raises(ValueError, match="one row of 8 inputs"):
        triton_gemv(_rand(2, 8), _rand(4, 8))


def test_dispatch_takes_the_kernel_only_for_one_half_precision_row_on_cuda():
    w = torch.empty(8, 4, dtype=torch.bfloat16)
    assert not _use_gemv(torch.empty(1, 4, dtype=torch.bfloat16), w)  # the CPU: F.linear
    if torch.cuda.is_available():
        wc = w.cuda()
        assert _use_gemv(torch.empty(1, 1, 4, dtype=torch.bfloat16, device="cuda"), wc)
        assert not _use_gemv(torch.empty(2, 4, dtype=torch.bfloat16, device="cuda"), wc)
        assert not _use_gemv(torch.empty(1, 4, device="cuda"), wc.float())


def test_linear_op_is_f_linear_and_passes_opcheck():
    x, w, b = _rand(2, 3, 16, seed=6), _rand(8, 16, seed=7), _rand(8, seed=8)
    torch.testing.assert_close(torch.ops.autodeploy.linear(x, w, b), torch.nn.functional.linear(x, w, b))
    torch.library.opcheck(torch.ops.autodeploy.linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.autodeploy.linear.default, (x, w, None))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs a Hopper or newer GPU")
def test_programmatic_dependent_launch_gives_the_same_bits(monkeypatch):
    """A chain of dependent one-row products (each reads the previous one's output; norm-GEMVs with a
    residual between them), eager and replayed from a CUDA graph: launched with programmatic
    dependent launch (weights loaded before the wait), the results equal the plain launches bit
    for bit."""
    from autodeploy.custom_ops import triton_pdl
    from autodeploy.custom_ops.triton_norm_gemv import triton_norm_gemv

    k = 2048
    ws = [_rand(k, k, dtype=torch.bfloat16, seed=10 + i) * 0.03 for i in range(6)]
    nw = _rand(k, dtype=torch.bfloat16, seed=20)
    x0 = _rand(1, k, dtype=torch.bfloat16, seed=21)

    def chain(x):
        res = x
        for i, w in enumerate(ws):
            if i % 2:
                x, res = triton_norm_gemv(x, res, nw, 1e-6, 0.0, True, w, None)
            else:
                x = triton_gemv(x, w)
        return x, res

    outs = {}
    for pdl in (False, True):
        monkeypatch.setattr(triton_pdl, "PDL_ENABLED", pdl)
        eager = chain(x0)
        static = x0.clone()
        chain(static)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = chain(static)
        graph.replay()
        torch.cuda.synchronize()
        outs[pdl] = (eager, captured)
        assert all(torch.equal(a, b) for a, b in zip(eager, captured))
    assert all(torch.equal(a, b) for a, b in zip(outs[False][0], outs[True][0]))
