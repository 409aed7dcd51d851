"""Pool accounting and the prepare op's arithmetic."""

import pytest
import torch

from autodeploy.custom_ops.prepare_metadata import swa_ring_pages
from autodeploy.runtime.pools import IndexAllocator, PoolExhausted


def test_allocator_is_exact():
    a = IndexAllocator(3, "pages")
    got = a.allocate(2)
    assert sorted(got) == [1, 2] and a.num_free == 1  # 0 is the null index, never handed out
    with pytest.raises(PoolExhausted, match="need 2, 1 free of 3"):
        a.allocate(2)
    a.free(got)
    with pytest.raises(RuntimeError, match="not allocated"):
        a.free([got[0]])
    assert a.num_used == 0 and a.num_free == 3


def test_sliding_window_metadata_stays_in_the_window_and_the_ring():
    page, window, budget = 4, 10, 6
    ring = swa_ring_pages(window, budget, page)
    seq_lens = torch.tensor([6, 1, 0], dtype=torch.int32)
    cached = torch.tensor([23, 40, 0], dtype=torch.int32)
    slots = torch.tensor([2, 1, 0], dtype=torch.int32)
    table = torch.zeros(3, 16, dtype=torch.int32)
    ids = torch.zeros(1, 7, dtype=torch.long)
    write, start, length, pages, cu = torch.ops.autodeploy.prepare_attention_metadata(
        ids, seq_lens, cached, slots, table, page, window, ring)
    assert cu.tolist() == [0, 6, 7, 7]
    assert start.tolist() == [14, 31, 0] and length.tolist() == [29, 41, 0]
    # lane 0 writes positions 23..28 into slot 2's ring, lane 1 position 40 into slot 1's ring
    expected = [(2 * ring + (p // page) % ring) * page + p % page for p in range(23, 29)]
    expected.append((1 * ring + (40 // page) % ring) * page + 0)
    assert write.tolist() == expected
    assert pages.min() >= 0 and pages.max() < 3 * ring  # padded lane 2 points at the null ring
    # the ring never evicts a key inside the window of the step's first query
    needed = range(start[0] // page, (length[0] - 1) // page + 1)
    assert len({p % ring for p in needed}) == len(needed)


def test_batch_inputs_host_copy_matches_the_device_buffers_and_survives_the_next_fill():
    """Host halves (flashinfer plans) read ``BatchInputs.host``: the step's raw inputs as the graph
    sees them, unchanged when the next step is filled."""
    from autodeploy.runtime.batch import BatchInputs, LaneInput

    batch = BatchInputs(3, 16, 4)
    lanes = [LaneInput([5, 6, 7], 2, 1, [3, 4]), LaneInput([8], 9, 2, [1], accepted=1, verify=True)]
    inputs = batch.fill(lanes, pad_to=6)
    host = batch.host
    for name in ("seq_lens", "cached_lens", "slots", "accepted_lens", "verify", "page_table"):
        assert torch.equal(host[name], inputs[name].cpu()), name
    assert host["seq_lens"].tolist() == [3, 1, 0, 2]  # the padding lane takes the 2 padded tokens
    assert host["page_table"][0].tolist() == [3, 4, 0, 0]
    before = {k: v.clone() for k, v in host.items()}
    batch.fill([LaneInput([1], 0, 3, [2])])
    assert all(torch.equal(host[k], before[k]) for k in before)
