"""insert_cached_ssm: graph shape, and decoding token by token equals the uncached graph."""

import pytest
import torch

from autodeploy import export_model
from autodeploy.fx_utils import op_nodes, placeholder_names
from autodeploy.graph_record import graph_record
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
    specs = graph_record(gm).caches
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


def test_verify_lane_keeps_the_state_and_the_next_step_replays_the_accepted_tokens():
    """With max_draft_tokens K = 3 every scan and conv gets replay buffers for 4 tokens. A verify
    lane's outputs equal the uncached graph's yet leave the state as it was; the next lane replays
    2 of its 4 tokens (accepted_lens) before its own and again matches the uncached graph."""
    model = build_model("mamba2")
    gm = export_model(model, max_seq_len=64)
    uncached = export_model(model, max_seq_len=64)
    run_pipeline(gm, ["insert_cached_ssm"], {"insert_cached_ssm": {"max_draft_tokens": 3}})
    specs = graph_record(gm).caches
    replay = [s for s in specs if s.pool == "replay"]
    assert sorted(s.name.rsplit("_", 1)[0] for s in replay) == ["replay_B"] * 2 + ["replay_conv"] * 2 + \
        ["replay_dt"] * 2 + ["replay_x"] * 2
    assert all(s.shape[0] == 4 for s in replay)
    scan = op_nodes(gm, SCAN)[0]
    assert [a.target for a in scan.args[8:11]] == ["replay_x_0", "replay_dt_0", "replay_B_0"]

    sizes = PoolSizes(max_batch_size=2, max_seq_len=64, page_size=8, max_num_tokens=32, num_full_pages=0)
    pools = CachePools(specs, sizes)
    batch = BatchInputs(2, 32, sizes.max_pages_per_seq)
    names = placeholder_names(gm)
    ids = torch.randint(0, 256, (16,)).tolist()
    with torch.no_grad():
        ref = uncached(torch.tensor([ids]), torch.arange(16)[None])

    def step(lane):
        args = batch.fill([LaneInput([], 0, 0, []), lane])
        args.update(pools.tensors)
        with torch.no_grad():
            return gm(*[args[n] for n in names])

    states = lambda: {s.name: pools.tensors[s.name][1].clone() for s in specs if s.pool in ("ssm", "conv")}  # noqa: E731
    step(LaneInput(ids[:8], 0, 1, []))
    after_prefill = states()
    out = step(LaneInput(ids[8:12], 8, 1, [], verify=True))  # last token + 3 drafts
    torch.testing.assert_close(out, ref[:, 8:12], atol=2e-5, rtol=0)
    for name, value in states().items():
        assert torch.equal(value, after_prefill[name]), name
    out = step(LaneInput(ids[10:13], 10, 1, [], accepted=2))  # 2 of 4 accepted; commit 3 more
    torch.testing.assert_close(out, ref[:, 10:13], atol=2e-5, rtol=0)
    out = step(LaneInput(ids[13:16], 13, 1, []))
    torch.testing.assert_close(out, ref[:, 13:16], atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="replay buffer holds 4 per slot"):
        step(LaneInput(ids[:5], 8, 1, [], verify=True))


def test_prepare_ssm_metadata_work_items():
    ids = torch.zeros(1, 6, dtype=torch.long)
    cu, has_state, replay, verify = torch.ops.autodeploy.prepare_ssm_metadata(
        ids, torch.tensor([4, 0, 2], dtype=torch.int32), torch.tensor([9, 0, 0], dtype=torch.int32),
        torch.tensor([3, 0, 0], dtype=torch.int32), torch.tensor([True, True, False]))
    assert cu.tolist() == [0, 4, 4, 6] and has_state.tolist() == [True, False, False]
    # a lane with no tokens verifies nothing
    assert replay.tolist() == [3, 0, 0] and verify.tolist() == [True, False, False]
