"""shard_tensor_parallel: regions found by structure, per-rank weights and head counts, and
numbers: the ranks' partial sums add up to the unsharded layer outputs.

The ranks run in threads of this process; their all-reduces meet in a barrier and sum in rank
order (the real op, over torch.distributed, runs in tests/test_tensor_parallel.py)."""

import copy
import threading

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from autodeploy import export_model
from autodeploy.fx_utils import op_nodes, owning_module
from autodeploy.models import build_model
from autodeploy.transforms import run_pipeline
from autodeploy.transforms.shard_tensor_parallel import ShardingError, find_regions
from helpers import ATTENTION, SSD_SCAN, op_counts

ALL_REDUCE = torch.ops.autodeploy.all_reduce.default
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # deepcopy of exported graphs


def shard(gm, rank: int, world_size: int):
    gm = copy.deepcopy(gm)
    _, info = run_pipeline(gm, ["match_attention", "shard_tensor_parallel"],
                           {"shard_tensor_parallel": {"rank": rank, "world_size": world_size}})
    return gm, info


def run_ranks(gms, *args):
    """Run one graph per rank concurrently; every all-reduce sums the ranks' inputs in rank order.
    Returns (outputs, the inputs of each rank's first all-reduce)."""
    n = len(gms)
    barrier, slots, first, result = threading.Barrier(n), [None] * n, [None] * n, [None]

    def reducer(rank):
        def all_reduce(x):
            slots[rank] = x
            if first[rank] is None:
                first[rank] = x.clone()
            if barrier.wait() == 0:
                result[0] = sum(slots[1:], slots[0].clone())
            barrier.wait()
            out = result[0].clone()
            barrier.wait()
            return out
        return all_reduce

    outs = [None] * n
    for rank, gm in enumerate(gms):
        for node in op_nodes(gm, ALL_REDUCE):
            node.target = reducer(rank)
        gm.recompile()

    def work(rank):
        with torch.no_grad():
            outs[rank] = gms[rank](*args)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outs, first


def node_value(gm, name, *args):
    """The value of node ``name`` when ``gm`` runs on ``args``."""
    seen = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node.name == name:
                seen["value"] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(*args)
    return seen["value"]


@pytest.fixture(scope="module")
def hybrid():
    model = build_model("hybrid")
    return model, export_model(model, max_seq_len=64)


def weight(gm, target):
    return gm.get_parameter(target)


def test_hybrid_regions_weights_and_head_counts(hybrid):
    model, gm = hybrid
    regions = find_regions(gm)
    assert [r.name for r in regions] == [f"model.layers.{i}.mixer" for i in range(8)]
    assert [owning_module(r.row).rsplit(".", 1)[-1] for r in regions] == \
        ["out_proj", "down_proj", "o_proj", "down_proj"] * 2  # the last down_proj -> lm_head is no region
    gm1, info = shard(gm, 1, 2)
    assert info.num_matches == 8 and info.details["all_reduces"] == 8
    assert op_counts(gm1)[ALL_REDUCE] == 8  # one per layer
    p = "model.model.layers"
    # Mamba2: in_proj rows [z | x B C | dt] = [128 | 128 32 32 | 8]; rank 1 owns SSM heads 4..7 and group 1
    full = weight(gm, f"{p}.0.mixer.in_proj.weight")
    rows = [*range(64, 128), *range(128 + 64, 128 + 128), *range(256 + 16, 256 + 32), *range(288 + 16, 288 + 32),
            *range(320 + 4, 320 + 8)]
    assert torch.equal(weight(gm1, f"{p}.0.mixer.in_proj.weight"), full[rows])
    conv = weight(gm, f"{p}.0.mixer.conv1d.weight")
    assert torch.equal(weight(gm1, f"{p}.0.mixer.conv1d.weight"), conv[[r - 128 for r in rows[64:160]]])
    for name in ("A_log", "D", "dt_bias"):
        assert torch.equal(weight(gm1, f"{p}.0.mixer.{name}"), weight(gm, f"{p}.0.mixer.{name}")[4:])
    assert torch.equal(weight(gm1, f"{p}.0.mixer.norm.weight"), weight(gm, f"{p}.0.mixer.norm.weight")[64:])
    assert torch.equal(weight(gm1, f"{p}.0.mixer.out_proj.weight"), weight(gm, f"{p}.0.mixer.out_proj.weight")[:, 64:])
    assert weight(gm1, f"{p}.2.mixer.q_proj.weight").shape == (32, 64)  # 2 of 4 query heads
    assert weight(gm1, f"{p}.2.mixer.k_proj.weight").shape == (16, 64)  # 1 of 2 KV heads
    assert weight(gm1, f"{p}.2.mixer.o_proj.weight").shape == (64, 32)
    assert weight(gm1, f"{p}.1.mixer.up_proj.weight").shape == (64, 64)
    assert weight(gm1, f"{p}.1.mixer.down_proj.weight").shape == (64, 64)
    assert weight(gm1, "model.lm_head.weight").shape == (256, 64)  # replicated
    assert model.model.layers[0].mixer.in_proj.weight.shape == (328, 64)  # the model itself untouched
    # hard-coded sizes rewritten; canonical ops see per-rank head counts (what the caches are sized by)
    splits = [n.args[1] for n in gm1.graph.nodes if n.target == torch.ops.aten.split_with_sizes.default]
    assert splits[:2] == [[64, 96, 4], [64, 16, 16]]
    attn = op_nodes(gm1, ATTENTION)[0]
    assert attn.args[0].meta["val"].shape[2] == 2 and attn.args[1].meta["val"].shape[2] == 1
    scan = op_nodes(gm1, SSD_SCAN)[0]
    assert scan.args[0].meta["val"].shape[2] == 4 and scan.args[3].meta["val"].shape[2] == 1


def test_hybrid_partial_sums_add_up_to_the_unsharded_outputs(hybrid):
    _, gm = hybrid
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(40)[None]
    with torch.no_grad():
        ref = gm(ids, pos)
    outs, partials = run_ranks([shard(gm, r, 2)[0] for r in range(2)], ids, pos)
    row = find_regions(gm)[0].row  # layer 0's out_proj
    torch.testing.assert_close(partials[0] + partials[1], node_value(gm, row.name, ids, pos), atol=1e-5, rtol=0)
    assert not torch.allclose(partials[0], partials[1])
    for out in outs:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
        assert torch.equal(out.argmax(-1), ref.argmax(-1))
    assert torch.equal(outs[0], outs[1])  # every rank computes the same logits


def test_mistral_replicates_its_single_kv_head():
    gm = export_model(build_model("mistral"), max_seq_len=64)
    shards = [shard(gm, r, 2) for r in range(2)]
    info = shards[0][1]
    assert info.details["replicated_kv_heads"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    k = "model.model.layers.0.self_attn.k_proj.weight"
    for g, _ in shards:
        assert torch.equal(weight(g, k), weight(gm, k))  # each rank keeps KV head 0
        assert weight(g, "model.model.layers.0.self_attn.q_proj.weight").shape == (32, 64)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))  # > window 24
    pos = torch.arange(30)[None]
    with torch.no_grad():
        ref = gm(ids, pos)
    outs, _ = run_ranks([g for g, _ in shards], ids, pos)
    torch.testing.assert_close(outs[0], ref, atol=1e-5, rtol=0)


def test_heads_that_do_not_divide_are_an_error_naming_the_module(hybrid):
    _, gm = hybrid
    with pytest.raises(ShardingError, match=r"model\.layers\.0\.mixer: 8 SSM heads do not divide by "
                                            r"tensor_parallel_size 3"):
        shard(gm, 0, 3)
    llama = export_model(build_model("llama"), max_seq_len=32)
    with pytest.raises(ShardingError, match=r"model\.layers\.0\.self_attn: 4 attention heads do not divide by "
                                            r"tensor_parallel_size 3"):
        shard(llama, 2, 3)


def test_a_region_that_cannot_be_split_stays_replicated(hybrid, caplog):
    """4 ranks: KV heads (2) and SSM groups (2) could be replicated, but the Mamba mixers' gated
    norm normalises 2 groups of 64 channels, which 4 ranks would cut: those mixers stay whole on
    every rank (a warning names them); attention and MLPs are split; the numbers still agree."""
    _, gm = hybrid
    shards = [shard(gm, r, 4) for r in range(4)]
    info = shards[0][1]
    assert info.details["replicated"] == ["model.layers.0.mixer", "model.layers.4.mixer"]
    assert info.details["replicated_kv_heads"] == ["model.layers.2.mixer", "model.layers.6.mixer"]
    assert "model.layers.0.mixer stays replicated" in caplog.text and "gated-norm" in caplog.text
    g = shards[1][0]
    assert weight(g, "model.model.layers.0.mixer.in_proj.weight").shape == (328, 64)
    assert weight(g, "model.model.layers.2.mixer.q_proj.weight").shape == (16, 64)  # 1 of 4 query heads
    assert torch.equal(weight(g, "model.model.layers.2.mixer.k_proj.weight"),
                       weight(gm, "model.model.layers.2.mixer.k_proj.weight")[:16])  # ranks 0, 1 read KV head 0
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(30)[None]
    with torch.no_grad():
        ref = gm(ids, pos)
    outs, _ = run_ranks([g for g, _ in shards], ids, pos)
    for out in outs:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_world_size_one_changes_nothing(hybrid):
    _, gm = hybrid
    g, info = shard(gm, 0, 1)
    assert not info.changed and info.num_matches == 0
    assert ALL_REDUCE not in op_counts(g) and len(g.graph.nodes) == len(gm.graph.nodes)


def test_detection_is_structural_not_by_name():
    """A plain module with made-up names: fc_a -> gelu -> fc_b (+ residual) is a region; fc_b's
    output reaches `head` only through the residual stream, so fc_b -> head is not."""

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(32, 16)
            self.fc_a, self.fc_b = nn.Linear(16, 48), nn.Linear(48, 16)
            self.head = nn.Linear(16, 32, bias=False)

        def forward(self, input_ids, position_ids=None, use_cache=False):
            h = self.emb(input_ids)
            h = h + self.fc_b(torch.nn.functional.gelu(self.fc_a(h)))
            return self.head(h)

    torch.manual_seed(0)
    model = Toy().eval()
    gm = export_model(model, max_seq_len=16)
    (region,) = find_regions(gm)
    assert [owning_module(c) for c in region.columns] == ["fc_a"] and owning_module(region.row) == "fc_b"
    shards = [shard(gm, r, 2) for r in range(2)]
    assert weight(shards[0][0], "model.fc_a.bias").shape == (24,)
    ids = torch.randint(0, 32, (1, 9))
    with torch.no_grad():
        ref = gm(ids, torch.arange(9)[None])
    outs, _ = run_ranks([g for g, _ in shards], ids, torch.arange(9)[None])
    torch.testing.assert_close(outs[0], ref, atol=1e-5, rtol=0)  # fc_b's bias added once, after the sum


def test_must_run_before_cache_insertion(hybrid):
    _, gm = hybrid
    g = copy.deepcopy(gm)
    run_pipeline(g, ["match_attention", "insert_cached_attention"])
    with pytest.raises(ValueError, match="must run before insert_cached_attention"):
        run_pipeline(g, ["match_attention", "shard_tensor_parallel"],
                     {"shard_tensor_parallel": {"rank": 0, "world_size": 2}})


def test_all_reduce_op(tmp_path):
    x = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        torch.ops.autodeploy.all_reduce(x)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        out = torch.ops.autodeploy.all_reduce(x.t())
        assert torch.equal(out, x.t()) and out.is_contiguous()
        torch.library.opcheck(torch.ops.autodeploy.all_reduce.default, (x,))
    finally:
        dist.destroy_process_group()
