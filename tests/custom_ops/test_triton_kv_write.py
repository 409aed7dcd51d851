"""The one-launch K/V write equals ``index_copy_`` into both pools: strided K/V (slices of a fused
QKV projection), a cast to the cache dtype, rows scattered over pages; untouched rows stay."""

import pytest
import torch

from helpers import DEVICE

pytest.importorskip("triton")

from autodeploy.custom_ops.triton_kv_write import triton_write_kv  # noqa: E402


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_write_kv_matches_index_copy(cache_dtype):
    g = torch.Generator().manual_seed(0)
    tokens, hkv, d, pages, page = 5, 2, 8, 6, 4
    qkv = torch.randn(1, tokens, 3 * hkv * d, generator=g).to(DEVICE)  # K and V: strided views, as after a fused GEMM
    k = qkv[..., hkv * d:2 * hkv * d].view(1, tokens, hkv, d)
    v = qkv[..., 2 * hkv * d:].view(1, tokens, hkv, d)
    rows = torch.randperm(pages * page, generator=g)[:tokens]
    k_cache = torch.randn(pages, page, hkv, d, generator=g).to(cache_dtype)
    v_cache = torch.randn(pages, page, hkv, d, generator=g).to(cache_dtype)
    rows, k_cache, v_cache = (t.to(DEVICE) for t in (rows, k_cache, v_cache))
    assert not k.is_contiguous()
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_k.view(-1, hkv, d).index_copy_(0, rows, k[0].to(cache_dtype))
    want_v.view(-1, hkv, d).index_copy_(0, rows, v[0].to(cache_dtype))
    triton_write_kv(k, v, k_cache, v_cache, rows)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
