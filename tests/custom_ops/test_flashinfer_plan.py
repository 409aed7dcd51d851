"""The flashinfer backend's host half (plan inputs) agrees with the graph's prepare node: the same
keys, pages and lengths for full-attention and sliding-window pools, on the CPU (no flashinfer)."""

import pytest
import torch

from autodeploy.custom_ops.flashinfer_attention import AttentionPlanSpec, csr_page_lists
from autodeploy.custom_ops.prepare_metadata import prepare_attention_metadata, swa_ring_pages

PAGE = 4
# lanes: (new tokens, cached, slot): prefill, chunk, decode far past the window, verify, empty, padding
LANES = [(9, 0, 1), (5, 6, 2), (1, 30, 3), (3, 17, 4), (0, 12, 5), (2, 0, 0)]


@pytest.mark.parametrize("window", [0, 6])
def test_csr_page_lists_match_the_prepare_node(window):
    ring = swa_ring_pages(window, 16, PAGE) if window else 0
    table = torch.zeros(len(LANES), 10, dtype=torch.int32)
    for i, (_, _, slot) in enumerate(LANES):
        if slot:
            table[i] = torch.arange(10) + 10 * slot  # distinct pages per lane
    host = {"seq_lens": torch.tensor([n for n, _, _ in LANES], dtype=torch.int32),
            "cached_lens": torch.tensor([c for _, c, _ in LANES], dtype=torch.int32),
            "slots": torch.tensor([s for _, _, s in LANES], dtype=torch.int32), "page_table": table}
    ids = torch.zeros(1, int(host["seq_lens"].sum()), dtype=torch.long)
    _, kv_start, kv_len, page_list, _ = prepare_attention_metadata(
        ids, host["seq_lens"], host["cached_lens"], host["slots"], table, PAGE, window, ring)
    spec = AttentionPlanSpec(PAGE, window, ring, window, 0.1, 0.0, 4, 2, 16, torch.bfloat16)
    qo_indptr, kv_indptr, kv_indices, last = csr_page_lists(spec, host)
    assert qo_indptr.tolist() == [0, 9, 14, 15, 18, 18, 20]
    for lane, (n, cached, _) in enumerate(LANES):
        pages = kv_indices[kv_indptr[lane]:kv_indptr[lane + 1]]
        if n == 0:
            assert len(pages) == 0 and last[lane] == 0
            continue
        first_page = int(kv_start[lane]) // PAGE
        keys = int(kv_len[lane]) - first_page * PAGE  # what flashinfer sees: keys from the first listed page
        assert (len(pages) - 1) * PAGE + int(last[lane]) == keys and 1 <= last[lane] <= PAGE
        assert pages.tolist() == page_list[lane, :len(pages)].tolist()
        if window:  # the listed keys cover the window of the step's first query
            assert first_page * PAGE <= max(cached - window + 1, 0)
