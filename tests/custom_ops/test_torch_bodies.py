"""The CPU bodies of rms_norm, fused_add_rms_norm and rope (torch.rms_norm; rows gathered once and
``roll`` for rotate_half) against the references written in transformers' order of operations:
the same float arithmetic, so equal bit for bit, on contiguous and transposed inputs."""

import pytest
import torch

from autodeploy.custom_ops.rms_norm import rms_norm_reference
from autodeploy.custom_ops.rope import rope_reference

ops = torch.ops.autodeploy


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype) * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("weight_offset,cast_first", [(0.0, True), (0.0, False), (1.0, False)])
@pytest.mark.parametrize("transposed", [False, True])
def test_rms_norm_equals_reference(dtype, weight_offset, cast_first, transposed):
    x = _rand(1, 3, 4, 64, dtype=dtype, seed=1)
    x = x.transpose(1, 2) if transposed else x  # Gemma 3 normalises transposed per-head views
    w = _rand(64, dtype=dtype, seed=2)
    got = ops.rms_norm(x, w, None, 1e-6, 0, weight_offset, cast_first, dtype)
    assert got.is_contiguous() and got.dtype == dtype
    assert torch.equal(got, rms_norm_reference(x, w, None, 1e-6, 0, weight_offset, cast_first, dtype))
    res = _rand(*x.shape, dtype=dtype, seed=3)
    normed, total = ops.fused_add_rms_norm(x, res, w, 1e-6, weight_offset, cast_first, dtype)
    assert torch.equal(total, x + res)
    assert torch.equal(normed, rms_norm_reference(x + res, w, None, 1e-6, 0, weight_offset, cast_first, dtype))


@pytest.mark.parametrize("layout,rotary_dim", [("heads_first", 16), ("tokens_first", 16), ("heads_first", 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_reference(layout, rotary_dim, dtype):
    T, d = 5, 16
    token_dim = 2 if layout == "heads_first" else 1
    q, k = _rand(1, T, 4, d, dtype=dtype, seed=4), _rand(1, T, 2, d, dtype=dtype, seed=5)
    if layout == "heads_first":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = _rand(40, rotary_dim, dtype=dtype, seed=6), _rand(40, rotary_dim, dtype=dtype, seed=7)
    pos = torch.tensor([[3, 4, 5, 0, 39]])
    got_q, got_k = ops.rope(q, k, pos, cos, sin, token_dim)
    want_q, want_k = rope_reference(q, k, pos, cos, sin, token_dim)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert got_q.stride() == torch.empty_like(q).stride()  # the layout the fake declares


def test_fused_norm_ops_equal_their_parts():
    x, res = _rand(1, 2, 64, seed=8), _rand(1, 2, 64, seed=9)
    w1, w2 = _rand(64, seed=10), _rand(64, seed=11)
    normed, total = ops.rms_norm_add_rms_norm(x, w1, 1e-6, 1.0, False, torch.float32, res, w2, 1e-5, 1.0, False,
                                              torch.float32)
    first = rms_norm_reference(x, w1, None, 1e-6, 0, 1.0, False, torch.float32)
    assert torch.equal(total, first + res)
    assert torch.equal(normed, rms_norm_reference(first + res, w2, None, 1e-5, 0, 1.0, False, torch.float32))
    q, k = _rand(1, 4, 3, 16, seed=12), _rand(1, 2, 3, 16, seed=13)
    qw, kw = _rand(16, seed=14), _rand(16, seed=15)
    cos, sin, pos = _rand(8, 16, seed=16), _rand(8, 16, seed=17), torch.tensor([[5, 6, 7]])
    got_q, got_k = ops.rms_norm_rope(q, k, qw, kw, 1e-6, 1.0, False, pos, cos, sin, 2)
    want_q, want_k = rope_reference(rms_norm_reference(q, qw, None, 1e-6, 0, 1.0, False, torch.float32),
                                    rms_norm_reference(k, kw, None, 1e-6, 0, 1.0, False, torch.float32),
                                    pos, cos, sin, 2)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
