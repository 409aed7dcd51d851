"""autodeploy::torch_cached_attention against attention written from its definition in float64,
one query and head at a time, reading each visible key from the pool row where its position lives.

Decode lanes (one token) take the op's mask-free path, longer lanes the masked reference; both
are checked on the full-attention pool (shuffled pages) and the sliding-window / block-local
rings, with GQA, windows, chunks, soft caps and sinks, and a padded lane in every batch.
"""

import pytest
import torch

from autodeploy.custom_ops.prepare_metadata import swa_ring_pages

CACHED = torch.ops.autodeploy.torch_cached_attention.default
PREPARE = torch.ops.autodeploy.prepare_attention_metadata.default
HEAD_DIM = 8


def _step(seq_lens, cached_lens, slots, page_size, hq, hkv, ring_window, chunk, dtype, seed):
    """Random q/k/v and pools for one step, the prepare op's metadata, and where position j of
    lane b lives in the flattened pool (``row(b, j)``)."""
    g = torch.Generator().manual_seed(seed)
    lanes = len(seq_lens)
    total = [s + c for s, c in zip(seq_lens, cached_lens)]
    T = sum(seq_lens)
    max_pages = max(1, max(-(-n // page_size) for n in total))
    table = torch.zeros(lanes, max_pages, dtype=torch.int32)
    if ring_window:
        ring = swa_ring_pages(ring_window, T, page_size)
        num_pages = (max(slots) + 1) * ring
    else:
        ring = 0
        need = [-(-n // page_size) for n in total]
        physical = (torch.randperm(sum(need), generator=g) + 1).int()  # page 0 is the null page
        first = 0
        for b, n in enumerate(need):
            table[b, :n] = physical[first:first + n]
            first += n
        num_pages = sum(need) + 1
    meta = PREPARE(torch.zeros(1, T, dtype=torch.long), torch.tensor(seq_lens, dtype=torch.int32),
                   torch.tensor(cached_lens, dtype=torch.int32), torch.tensor(slots, dtype=torch.int32), table,
                   page_size, ring_window, ring, chunk if ring_window else 0)

    def row(b: int, j: int) -> int:
        page = slots[b] * ring + (j // page_size) % ring if ring_window else int(table[b, j // page_size])
        return page * page_size + j % page_size

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    tensors = (rand(1, T, hq, HEAD_DIM), rand(1, T, hkv, HEAD_DIM), rand(1, T, hkv, HEAD_DIM),
               rand(num_pages, page_size, hkv, HEAD_DIM), rand(num_pages, page_size, hkv, HEAD_DIM))
    return tensors, meta, row


def _definition(q, k_cache, v_cache, seq_lens, cached_lens, row, scale, window, chunk, soft_cap, sinks):
    """Float64, from the definition: the query at position p sees key j <= p, j > p - W (window),
    j in p's block of C positions (chunk); logits soft-capped; a sink joins the denominator."""
    hq, hkv = q.shape[2], k_cache.shape[2]
    keys = k_cache.reshape(-1, hkv, HEAD_DIM).double()
    values = v_cache.reshape(-1, hkv, HEAD_DIM).double()
    out = torch.zeros(q.shape, dtype=torch.float64)
    t = 0
    for b, (n, cached) in enumerate(zip(seq_lens, cached_lens)):
        for i in range(n):
            p = cached + i
            visible = [j for j in range(p + 1)
                       if (not window or j > p - window) and (not chunk or j // chunk == p // chunk)]
            rows = [row(b, j) for j in visible]
            for h in range(hq):
                kh = h // (hq // hkv)
                logits = keys[rows, kh] @ q[0, t, h].double() * scale
                if soft_cap:
                    logits = torch.tanh(logits / soft_cap) * soft_cap
                if sinks is not None:
                    logits = torch.cat([logits, sinks[h:h + 1].double()])
                probs = torch.softmax(logits, 0)[:len(rows)]
                out[0, t, h] = probs @ values[rows, kh]
            t += 1
    return out


# decode lanes (the mask-free path), a padded lane (0 tokens, slot 0), an extend lane (the masked path)
DECODE = dict(seq_lens=[1, 1, 0, 1], cached_lens=[30, 4, 0, 17], slots=[1, 2, 0, 3])
MIXED = dict(seq_lens=[1, 5, 0, 1], cached_lens=[26, 9, 0, 40], slots=[2, 1, 0, 3])
CASES = {  # name: (ring window, op window, chunk)
    "full": (0, 0, 0),
    "window_on_full_pool": (0, 6, 0),
    "window_ring": (6, 6, 0),
    "chunk_on_full_pool": (0, 0, 8),
    "chunk_ring": (8, 8, 8),
}


@pytest.mark.parametrize("lanes", [DECODE, MIXED], ids=["decode", "mixed"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1), (2, 2)])
@pytest.mark.parametrize("extras", ["plain", "soft_cap_sinks"])
def test_matches_definition_float64(lanes, case, hq, hkv, extras):
    ring_window, window, chunk = CASES[case]
    (q, k, v, k_cache, v_cache), meta, row = _step(**lanes, page_size=4, hq=hq, hkv=hkv, ring_window=ring_window,
                                                   chunk=chunk, dtype=torch.float64, seed=hq + hkv + len(case))
    soft_cap = 2.5 if extras == "soft_cap_sinks" else 0.0
    sinks = torch.randn(hq, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 if soft_cap else None
    out = CACHED(q, k, v, k_cache, v_cache, *meta, 0.4, window, soft_cap, sinks, chunk)
    assert out.dtype == torch.float64
    expected = _definition(q, k_cache, v_cache, lanes["seq_lens"], lanes["cached_lens"], row, 0.4, window, chunk,
                           soft_cap, sinks)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    t = 0
    for b, (n, cached) in enumerate(zip(lanes["seq_lens"], lanes["cached_lens"])):  # the step's K/V were written
        for i in range(n):
            assert torch.equal(k_cache.view(-1, hkv, HEAD_DIM)[row(b, cached + i)], k[0, t])
            assert torch.equal(v_cache.view(-1, hkv, HEAD_DIM)[row(b, cached + i)], v[0, t])
            t += 1


@pytest.mark.parametrize("case", list(CASES))
def test_float32_decode_close_to_float64_definition(case):
    ring_window, window, chunk = CASES[case]
    (q, k, v, k_cache, v_cache), meta, row = _step(**DECODE, page_size=4, hq=4, hkv=2, ring_window=ring_window,
                                                   chunk=chunk, dtype=torch.float32, seed=5)
    out = CACHED(q, k, v, k_cache, v_cache, *meta, 0.4, window, 0.0, None, chunk)
    assert out.dtype == torch.float32
    expected = _definition(q, k_cache, v_cache, DECODE["seq_lens"], DECODE["cached_lens"], row, 0.4, window, chunk,
                           0.0, None)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_opcheck_decode_and_mixed():
    for lanes in (DECODE, MIXED):
        (q, k, v, k_cache, v_cache), meta, _ = _step(**lanes, page_size=4, hq=4, hkv=2, ring_window=0, chunk=0,
                                                     dtype=torch.float32, seed=2)
        torch.library.opcheck(CACHED, (q, k, v, k_cache, v_cache, *meta, 0.25, 0, 0.0, None, 0))
