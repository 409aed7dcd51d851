"""autodeploy::triton_cached_attention against the torch backend (the oracle) on identical inputs.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py switches it on before
anything imports triton). Sizes are tiny: the interpreter executes every program in numpy.
"""

import pytest
import torch

from helpers import DEVICE

pytest.importorskip("triton")

from autodeploy.custom_ops.prepare_metadata import swa_ring_pages  # noqa: E402
from autodeploy.custom_ops.triton_attention import triton_cached_attention  # noqa: E402, F401

TRITON = torch.ops.autodeploy.triton_cached_attention.default
TORCH = torch.ops.autodeploy.torch_cached_attention.default
PREPARE = torch.ops.autodeploy.prepare_attention_metadata.default
HEAD_DIM = 16


def make_step(seq_lens, cached_lens, slots, page_size, hq, hkv, window=0, dtype=torch.float32, seed=0, chunk=0):
    """Random step (q, k, v), random pools and the prepare op's metadata for it.

    window = 0: full-attention pool, each lane's page table is a shuffled set of physical pages
    (page 0 is the null page, used by padded lanes). window > 0: the sliding-window ring pool;
    with chunk = C (and window = C, the ring's bound) the block-local layers' ring.
    """
    g = torch.Generator().manual_seed(seed)
    seq_lens, cached_lens = torch.tensor(seq_lens, dtype=torch.int32), torch.tensor(cached_lens, dtype=torch.int32)
    slots = torch.tensor(slots, dtype=torch.int32)
    total = seq_lens + cached_lens
    max_pages = int(-(-total.max() // page_size))
    table = torch.zeros(len(seq_lens), max_pages, dtype=torch.int32)
    if window > 0:
        ring = swa_ring_pages(window, int(seq_lens.sum()), page_size)
        num_pages = (int(slots.max()) + 1) * ring
    else:
        ring = 0
        need = [int(-(-n // page_size)) for n in total.tolist()]
        physical = (torch.randperm(sum(need), generator=g) + 1).int()  # shuffled, never page 0
        for lane, first in enumerate(torch.tensor([0] + need).cumsum(0)[:-1].tolist()):
            table[lane, : need[lane]] = physical[first: first + need[lane]]
        num_pages = sum(need) + 1
    T = int(seq_lens.sum())
    ids = torch.zeros(1, T, dtype=torch.long)
    meta = PREPARE(ids, seq_lens, cached_lens, slots, table, page_size, window, ring, chunk if window else 0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    q, k, v = rand(1, T, hq, HEAD_DIM), rand(1, T, hkv, HEAD_DIM), rand(1, T, hkv, HEAD_DIM)
    k_cache, v_cache = rand(num_pages, page_size, hkv, HEAD_DIM), rand(num_pages, page_size, hkv, HEAD_DIM)
    return q, k, v, k_cache, v_cache, [m.to(DEVICE) for m in meta]


def check_against_torch(step, scale=0.25, window=0, soft_cap=0.0, sinks=None, atol=1e-5, rtol=1e-5, chunk=0):
    q, k, v, k_cache, v_cache, meta = step
    args = (scale, window, soft_cap, sinks, chunk)
    kc_t, vc_t = k_cache.clone(), v_cache.clone()
    expected = TORCH(q, k, v, kc_t, vc_t, *meta, *args)
    out = TRITON(q, k, v, k_cache, v_cache, *meta, *args)
    assert torch.equal(k_cache, kc_t) and torch.equal(v_cache, vc_t)  # identical writes
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    check_against_torch.pools = (k_cache, v_cache)  # after the step's writes, for a float64 reference
    return out


def block_local_float64(q, k_cache, v_cache, seq_lens, cached_lens, slots, page_size, ring, chunk, scale):
    """Block-local attention written from its definition, float64, one query and head at a time:
    query at position p sees positions p - p % C .. p, read from the slot's ring (logical page
    x at slot * ring + x % ring) or, with ring = 0, from the lane's pages in ``ring`` order."""
    hq, hkv, d = q.shape[2], k_cache.shape[2], q.shape[3]
    keys_flat, values_flat = k_cache.reshape(-1, hkv, d).double().cpu(), v_cache.reshape(-1, hkv, d).double().cpu()
    out = torch.zeros(q.shape, dtype=torch.float64)
    t = 0
    for n, cached, slot in zip(seq_lens, cached_lens, slots):
        for i in range(n):
            pos = cached + i
            rows = [(slot * ring + (p // page_size) % ring) * page_size + p % page_size
                    for p in range(pos - pos % chunk, pos + 1)]
            for h in range(hq):
                kh = h // (hq // hkv)
                probs = torch.softmax(keys_flat[rows, kh] @ q[0, t, h].double().cpu() * scale, 0)
                out[0, t, h] = probs @ values_flat[rows, kh]
            t += 1
    return out


# Lanes: decode, extend, padded (0 tokens, slot 0, null page), decode, prefill longer than one
# query block (so several programs split one lane), extend.
MIXED = dict(seq_lens=[1, 5, 0, 1, 37, 3], cached_lens=[9, 6, 0, 20, 0, 13], slots=[1, 2, 0, 3, 4, 5])


@pytest.mark.parametrize("page_size", [4, 8])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_mixed_batch_shuffled_pages(page_size, hq, hkv):
    check_against_torch(make_step(**MIXED, page_size=page_size, hq=hq, hkv=hkv, seed=page_size + hkv))


@pytest.mark.parametrize("page_size", [4, 8])
def test_decode_only_batch(page_size):
    # T <= lanes picks the small tile; lane 2 is padded
    step = make_step([1, 1, 0, 1], [30, 1, 0, 7], [1, 2, 0, 3], page_size, hq=4, hkv=2, seed=3)
    check_against_torch(step)


@pytest.mark.parametrize("page_size", [4, 8])
@pytest.mark.parametrize("window", [3, 8])
def test_sliding_window_ring_wraps(page_size, window):
    # cached lengths well past the window: the ring has wrapped, kv_start > 0
    step = make_step([1, 6, 0, 4], [23, 40, 0, 11], [2, 1, 0, 3], page_size, hq=4, hkv=2, window=window,
                     seed=window)
    assert step[-1][1].max() > 0
    check_against_torch(step, window=window)


def test_sliding_window_over_full_pool():
    # a window on the full-attention layout: kv_start = 0, the window is applied per query
    step = make_step(**MIXED, page_size=4, hq=4, hkv=2, seed=5)
    check_against_torch(step, window=5)


@pytest.mark.parametrize("window", [0, 6])
def test_soft_cap_and_sinks(window):
    step = make_step([1, 7, 0, 2], [12, 25, 0, 3], [1, 2, 0, 3], 4, hq=4, hkv=2, window=window, seed=7)
    sinks = (torch.randn(4, generator=torch.Generator().manual_seed(1)) * 2).to(DEVICE)
    check_against_torch(step, scale=0.9, window=window, soft_cap=2.5)
    out = check_against_torch(step, window=window, sinks=sinks)
    assert not torch.allclose(out, check_against_torch(step, window=window))  # sinks do change it
    check_against_torch(step, scale=0.9, window=window, soft_cap=2.5, sinks=sinks)


@pytest.mark.parametrize("page_size", [4, 8])
def test_bfloat16(page_size):
    # both backends accumulate in float32; the kernel rounds probabilities to bf16 before P @ V and
    # both round the output to bf16, so compare at bf16 resolution
    step = make_step(**MIXED, page_size=page_size, hq=4, hkv=2, dtype=torch.bfloat16, seed=11)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    check_against_torch(step, soft_cap=3.0, sinks=sinks, atol=2e-2, rtol=2e-2)
    ring = make_step([1, 6, 0], [23, 40, 0], [2, 1, 0], page_size, hq=4, hkv=2, window=5,
                     dtype=torch.bfloat16, seed=12)
    check_against_torch(ring, window=5, atol=2e-2, rtol=2e-2)


@pytest.fixture
def small_splits(monkeypatch):
    """Split-KV at test sizes: lanes that can hold 16+ keys are split, 8 keys per split."""
    from autodeploy.custom_ops import triton_attention

    monkeypatch.setattr(triton_attention, "SPLIT_MIN_KEYS", 16)
    monkeypatch.setattr(triton_attention, "KEYS_PER_SPLIT", 8)
    return triton_attention


@pytest.mark.parametrize("window", [0, 6])
def test_split_keys_decode_matches_torch(small_splits, window):
    # decode lanes (one token per lane) over up to 47 keys, split over several programs whose
    # pieces are merged: some splits see no visible key at all (window, short lanes, padding lane)
    step = make_step([1, 1, 0, 1], [46, 3, 0, 20], [1, 2, 0, 3], 4, hq=4, hkv=2, window=window, seed=13)
    assert small_splits.num_key_splits(4, 4, step[-1][3].shape[1] * 4) > 1
    check_against_torch(step, window=window)
    sinks = (torch.randn(4, generator=torch.Generator().manual_seed(3)) * 2).to(DEVICE)
    check_against_torch(step, window=window, soft_cap=2.5, sinks=sinks)  # the sink is counted once


def test_split_keys_only_for_decode_like_steps(small_splits):
    assert small_splits.num_key_splits(num_tokens=5, num_lanes=4, max_keys=4096) == 1  # prefill-like
    assert small_splits.num_key_splits(num_tokens=4, num_lanes=4, max_keys=8) == 1  # short lanes
    assert small_splits.num_key_splits(num_tokens=4, num_lanes=4, max_keys=40) == 5
    assert small_splits.num_key_splits(num_tokens=1, num_lanes=4, max_keys=10**6) == small_splits.MAX_SPLITS
    check_against_torch(make_step(**MIXED, page_size=4, hq=4, hkv=2, seed=14))  # T > lanes: one split


def test_empty_step_and_opcheck():
    step = make_step([0, 0], [0, 0], [0, 0], 4, hq=4, hkv=2)
    assert check_against_torch(step).shape == (1, 0, 4, HEAD_DIM)
    q, k, v, k_cache, v_cache, meta = make_step([1, 3], [5, 0], [1, 2], 4, hq=4, hkv=2, seed=4)
    torch.library.opcheck(TRITON, (q, k, v, k_cache, v_cache, *meta, 0.25, 0, 0.0, None))


@pytest.mark.parametrize("page_size", [4, 8])
@pytest.mark.parametrize("chunk", [3, 8])
def test_block_local_ring_matches_torch_and_float64(page_size, chunk):
    """Chunked attention on its ring: lanes whose steps cross block boundaries (cached 23 + 6 new
    tokens across position 24), past several blocks (the ring has wrapped), decode and padded lanes."""
    lanes = dict(seq_lens=[1, 6, 0, 4, 9], cached_lens=[23, 23, 0, 11, 40], slots=[2, 1, 0, 3, 4])
    step = make_step(**lanes, page_size=page_size, hq=4, hkv=2, window=chunk, chunk=chunk, seed=chunk)
    assert step[-1][1].tolist() == [c // chunk * chunk for c in lanes["cached_lens"]]  # kv_start: block starts
    out = check_against_torch(step, chunk=chunk)
    ring = swa_ring_pages(chunk, sum(lanes["seq_lens"]), page_size)
    expected = block_local_float64(step[0], *check_against_torch.pools, **lanes, page_size=page_size, ring=ring,
                                   chunk=chunk, scale=0.25)
    torch.testing.assert_close(out.double().cpu(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, check_against_torch(step, window=chunk))  # a window is not a chunk


def test_block_local_over_full_pool():
    # a chunk on the full-attention layout (a chunk at least as long as max_seq_len): kv_start = 0
    step = make_step(**MIXED, page_size=4, hq=4, hkv=2, seed=15)
    check_against_torch(step, chunk=5)
    check_against_torch(step, chunk=5, soft_cap=2.5, sinks=torch.randn(4).to(DEVICE))


def test_block_local_bfloat16_and_split_keys(small_splits):
    step = make_step([1, 6, 0], [23, 40, 0], [2, 1, 0], 4, hq=4, hkv=2, window=8, chunk=8,
                     dtype=torch.bfloat16, seed=16)
    check_against_torch(step, window=0, chunk=8, atol=2e-2, rtol=2e-2)
    decode = make_step([1, 1, 0, 1], [46, 3, 0, 20], [1, 2, 0, 3], 4, hq=4, hkv=2, seed=17)  # split-KV, full pool
    check_against_torch(decode, chunk=7)
