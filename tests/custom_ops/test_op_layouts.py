"""Every canonical op on non-contiguous inputs (transposed views, column slices of a fused
projection, as models hand them over): ``torch.library.opcheck`` compares the fake
implementation's output shapes, dtypes and strides with the real op's, so inductor, which trusts
the fake strides, computes on the layout the op really returns."""

import pytest
import torch

ops = torch.ops.autodeploy


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _transposed(b, s, h, d, seed=0):
    """A [b, h, s, d] view of a [b, s, h, d] tensor, as q.view(...).transpose(1, 2) gives."""
    return _randn(b, s, h, d, seed=seed).transpose(1, 2)


def _column_slice(*shape, extra=8, seed=0):
    """The leading columns of a wider tensor, as a fused projection's split gives."""
    return _randn(*shape[:-1], shape[-1] + extra, seed=seed)[..., : shape[-1]]


def _cases():
    w8 = _randn(8, seed=9)
    yield "rms_norm transposed", ops.rms_norm.default, (_transposed(1, 5, 4, 8), w8, None, 1e-6, 0, 1.0, False,
                                                        torch.float32)
    yield "rms_norm sliced gated", ops.rms_norm.default, (_column_slice(1, 5, 16), _randn(16),
                                                          _column_slice(1, 5, 16, seed=2), 1e-6, 8, 0.0, True,
                                                          torch.float32)
    yield "rms_norm to float64", ops.rms_norm.default, (_transposed(1, 5, 4, 8), w8, None, 1e-6, 0, 0.0, False,
                                                       torch.float64)
    yield "fused_add_rms_norm transposed", ops.fused_add_rms_norm.default, (
        _transposed(1, 5, 4, 8), _transposed(1, 5, 4, 8, seed=3), w8, 1e-6, 1.0, False, torch.float32)
    yield "fused_add_rms_norm sliced", ops.fused_add_rms_norm.default, (
        _column_slice(1, 5, 8), _randn(1, 5, 8), w8, 1e-6, 0.0, True, torch.float32)
    pos, cos, sin = torch.tensor([[0, 3, 1, 7, 2]]), _randn(16, 8, seed=4), _randn(16, 8, seed=5)
    yield "rope head-major views", ops.rope.default, (_transposed(1, 5, 4, 8), _transposed(1, 5, 2, 8, seed=1), pos,
                                                      cos, sin, 2)
    yield "rope partial rotary", ops.rope.default, (_transposed(1, 5, 4, 12), _transposed(1, 5, 2, 12, seed=1), pos,
                                                    cos, sin, 2)
    yield "rope token-major slices", ops.rope.default, (_column_slice(1, 5, 4, 8), _column_slice(1, 5, 2, 8, seed=1),
                                                        pos, cos, sin, 1)
    yield "gated_activation slices", ops.gated_activation.default, (_column_slice(1, 5, 16),
                                                                    _column_slice(1, 5, 16, seed=1), "silu")
    yield "gated_activation transposed", ops.gated_activation.default, (_transposed(1, 5, 4, 8), None, "gelu_tanh")
    yield "attention transposed", ops.attention.default, (
        _transposed(1, 6, 4, 8).transpose(1, 2), _column_slice(1, 6, 2, 8, seed=1), _column_slice(1, 6, 2, 8, seed=2),
        0.3, 3, 2.0, _randn(4, seed=3))
    yield "causal_conv1d sliced", ops.causal_conv1d.default, (_column_slice(2, 5, 6, seed=1).transpose(1, 2),
                                                              _randn(6, 4), _randn(6), "silu")
    b, s, h, p, g, n = 2, 9, 4, 3, 2, 5
    yield "ssd_scan sliced", ops.ssd_scan.default, (
        _column_slice(b, s, h, p, seed=1), _column_slice(b, s, h, seed=2), -torch.rand(h) - 0.1,
        _column_slice(b, s, g, n, seed=3), _column_slice(b, s, g, n, seed=4), _randn(h), _randn(h), None,
        True, 0.0, float("inf"), 4)


CASES = list(_cases())


@pytest.mark.parametrize("name,op,args", CASES, ids=[c[0] for c in CASES])
def test_fake_matches_real_on_strided_inputs(name, op, args):
    assert any(isinstance(a, torch.Tensor) and not a.is_contiguous() for a in args), name
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
