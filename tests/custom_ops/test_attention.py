"""autodeploy::attention against an independent float64 loop reference."""

import math

import pytest
import torch

import autodeploy  # noqa: F401
from autodeploy.custom_ops.attention import attention_reference


def loop_reference(q, k, v, scale, window=0, soft_cap=0.0, sinks=None, chunk=0):
    """One query and one head at a time, float64, written from the definition."""
    q, k, v = q.double(), k.double(), v.double()
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    out = torch.zeros(b, sq, hq, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(sq):
                pos = skv - sq + i
                lo = 0 if window <= 0 else max(0, pos - window + 1)
                if chunk > 0:
                    lo = pos - pos % chunk  # the start of its own block
                keys = range(lo, pos + 1)
                logits = [float(q[bi, i, h] @ k[bi, j, kh]) * scale for j in keys]
                if soft_cap > 0:
                    logits = [math.tanh(x / soft_cap) * soft_cap for x in logits]
                m = max(logits + ([float(sinks[h])] if sinks is not None else []))
                weights = [math.exp(x - m) for x in logits]
                denom = sum(weights) + (math.exp(float(sinks[h]) - m) if sinks is not None else 0.0)
                for w, j in zip(weights, keys):
                    out[bi, i, h] += w / denom * v[bi, j, kh]
    return out


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("window", [0, 3, 9, 50])
@pytest.mark.parametrize("soft_cap", [0.0, 2.5])
def test_attention_matches_loop_reference(hq, hkv, window, soft_cap):
    torch.manual_seed(hq * 100 + hkv * 10 + window)
    q = torch.randn(2, 11, hq, 8)
    k = torch.randn(2, 11, hkv, 8)
    v = torch.randn(2, 11, hkv, 8)
    out = torch.ops.autodeploy.attention(q, k, v, 0.35, window, soft_cap, None)
    expected = loop_reference(q, k, v, 0.35, window, soft_cap)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("window", [0, 4])
def test_attention_sinks(window):
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 9, 4, 8), torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8)
    sinks = torch.randn(4) * 2
    out = torch.ops.autodeploy.attention(q, k, v, 0.3, window, 0.0, sinks)
    torch.testing.assert_close(out.double(), loop_reference(q, k, v, 0.3, window, 0.0, sinks), atol=2e-6, rtol=2e-6)
    # sinks only add mass to the denominator: outputs shrink compared with no sinks
    plain = torch.ops.autodeploy.attention(q, k, v, 0.3, window, 0.0, None)
    assert not torch.allclose(out, plain)


def test_queries_aligned_to_end_of_keys():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 3, 2, 8), torch.randn(1, 10, 2, 8), torch.randn(1, 10, 2, 8)
    out = attention_reference(q, k, v, 0.3, 4)
    torch.testing.assert_close(out.double(), loop_reference(q, k, v, 0.3, 4), atol=2e-6, rtol=2e-6)


def test_float64_inputs_stay_float64():
    q = torch.randn(1, 5, 2, 4, dtype=torch.float64)
    out = torch.ops.autodeploy.attention(q, q, q, 0.5, 0, 0.0, None)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, loop_reference(q, q, q, 0.5), atol=1e-12, rtol=1e-12)


def test_bad_head_ratio_is_an_error():
    with pytest.raises(ValueError, match="multiple"):
        attention_reference(torch.randn(1, 3, 3, 4), torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4), 1.0)


def test_opcheck():
    q, k, v = torch.randn(1, 6, 4, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)
    torch.library.opcheck(torch.ops.autodeploy.attention.default, (q, k, v, 0.3, 3, 2.0, torch.randn(4)))
    torch.library.opcheck(torch.ops.autodeploy.attention.default, (q, k, v, 0.3, 0, 0.0, None))


@pytest.mark.parametrize("chunk", [1, 3, 4, 11, 20])
@pytest.mark.parametrize("sq", [11, 5, 1])
def test_block_local_attention_matches_loop_reference(chunk, sq):
    """Chunk C: a query sees the keys of its own block of C positions; queries at the end of the keys
    (sq < skv, as in a cached step) keep their absolute positions."""
    torch.manual_seed(chunk * 10 + sq)
    q, k, v = torch.randn(2, sq, 4, 8), torch.randn(2, 11, 2, 8), torch.randn(2, 11, 2, 8)
    out = torch.ops.autodeploy.attention(q, k, v, 0.35, 0, 1.5, None, chunk)
    torch.testing.assert_close(out.double(), loop_reference(q, k, v, 0.35, 0, 1.5, chunk=chunk), atol=2e-6, rtol=2e-6)
