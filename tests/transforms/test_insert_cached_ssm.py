"""insert_cached_ssm: graph shape, and decoding token by token equals the uncached graph."""

import torch

from autodeploy import export_model
from autodeploy.fx_utils import placeholder_names
from autodeploy.models import build_model
from autodeploy.runtime.batch import BatchInputs, LaneInput
from autodeploy.runtime.pools import CachePools, PoolSizes
from autodeploy.transforms import run_pipeline

from helpers import CAUSAL_CONV1D, SSD_SCAN, op_counts

SCAN = torch.ops.autodeploy.torch_cached_ssd_scan.default
CONV = torch.ops.autodeploy.torch_cached_causal_conv1d.default
PREPARE = torch.ops.autodeploy.prepare_ssm_metadata.default


def test_mamba2_prefill_chunk_then_decodes_match_uncached():
    model = build_model("mamba2")
    gm = export_model(model, max_seq_len=64)
    uncached = export_model(model, max_seq_len=64)
    (info,) = run_pipeline(gm, ["insert_cached_ssm"])
    assert info.num_matches == 4
    counts = op_counts(gm)
    assert counts[SCAN] == 2 and counts[CONV] == 2 and counts[PREPARE] == 1
    assert counts[SSD_SCAN] == 0 and counts[CAUSAL_CONV1D] == 0
    specs = gm.meta["autodeploy_caches"]
    assert [s.pool for s in specs] == ["ssm", "ssm", "conv", "conv"]

    sizes = PoolSizes(max_batch_size=3, max_seq_len=64, page_size=8, max_num_tokens=32, num_full_pages=0)
    pools = CachePools(specs, sizes)
    batch = BatchInputs(3, 32, sizes.max_pages_per_seq)
    names = placeholder_names(gm)
    ids = torch.randint(0, 256, (20,)).tolist()
    # stale state in the slot from an earlier request must not leak into a new sequence
    for t in pools.tensors.values():
        t.normal_()
    chunks = [(0, 11)] + [(i, i + 1) for i in range(11, 20)]
    outs = []
    for start, end in chunks:
        # lane 0 is padding (no tokens, null slot); the sequence sits in lane 1, slot 2
        args = batch.fill([LaneInput([], 0, 0, []), LaneInput(ids[start:end], start, 2, [])])
        args.update(pools.tensors)
        with torch.no_grad():
            outs.append(gm(*[args[n] for n in names]))
    with torch.no_grad():
        ref = uncached(torch.tensor([ids]), torch.arange(20)[None])
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=2e-5, rtol=0)
