"""The Triton prepare kernels give the torch reference's metadata exactly (interpreter on the CPU):
full-attention, sliding-window and block-local (chunked) pools, lanes of every kind (prefill, chunk, decode, verify,
empty, the padding lane), a strided page table as the runner passes it."""

import pytest
import torch

from helpers import DEVICE

pytest.importorskip("triton")

from autodeploy.custom_ops import prepare_metadata as pm  # noqa: E402
from autodeploy.custom_ops.triton_prepare_metadata import (  # noqa: E402
    triton_prepare_attention_metadata,
    triton_prepare_ssm_metadata,
)

i32 = torch.int32


def _lanes(seed: int, lanes: int = 6, width: int = 7, page: int = 4):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, 9, (lanes,), generator=g, dtype=i32)
    seq[2] = 0  # an empty lane
    cached = torch.randint(0, page * (width - 3), (lanes,), generator=g, dtype=i32)
    slots = torch.randperm(lanes, generator=g).to(i32) + 1
    table = torch.randint(1, 50, (width, lanes), generator=g, dtype=i32).T  # strided, as BatchInputs'
    accepted = torch.randint(0, 3, (lanes,), generator=g, dtype=i32)
    verify = torch.rand(lanes, generator=g) < 0.4
    ids = torch.zeros(1, int(seq.sum()), dtype=torch.long)
    return tuple(t.to(DEVICE) for t in (ids, seq, cached, slots, table, accepted, verify))



@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window,ring,chunk", [(0, 0, 0), (6, 5, 0), (1, 3, 0), (8, 6, 8)])
def test_attention_metadata_matches_the_torch_ops(seed, window, ring, chunk):
    ids, seq, cached, slots, table, _, _ = _lanes(seed)
    want = pm.attention_metadata_reference(ids, seq, cached, slots, table, 4, window, ring, chunk)
    got = triton_prepare_attention_metadata(ids.shape[-1], seq, cached, slots, table, 4, window, ring, chunk)
    for name, g, w in zip(("write_idx", "kv_start", "kv_len", "page_list", "cu_seqlens"), got, want):
        assert g.dtype == w.dtype and torch.equal(g, w), name


@pytest.mark.parametrize("seed", range(4))
def test_ssm_metadata_matches_the_torch_ops(seed):
    ids, seq, cached, _, _, accepted, verify = _lanes(seed)
    want = pm.ssm_metadata_reference(ids, seq, cached, accepted, verify)
    got = triton_prepare_ssm_metadata(seq, cached, accepted, verify)
    for name, g, w in zip(("cu_seqlens", "has_state", "replay_lens", "is_verify"), got, want):
        assert g.dtype == w.dtype and torch.equal(g, w), name
