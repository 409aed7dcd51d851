"""fuse_norm_linear on zoo models after the cached pipeline's pattern matchers: every plain norm
that feeds only a linear layer is fused (counted against the graph before), nothing else changes
(float32 logits equal the unfused graph's exactly: the op is the same pair on the CPU)."""

import pytest
import torch

from autodeploy import export_model
from autodeploy.models import build_model
from autodeploy.transforms import run_pipeline
from helpers import op_counts

ops = torch.ops.autodeploy
BEFORE = ["match_attention", "match_rope", "match_rms_norm", "fuse_projections", "match_gated_activation",
          "match_linear"]


def _norms_feeding_one_linear(gm) -> int:
    count = 0
    for node in gm.graph.nodes:
        if node.target == ops.rms_norm.default and node.args[2] is None and not node.args[4]:
            feeds = node
        elif node.target == ops.fused_add_rms_norm.default:
            feeds = next((u for u in node.users if u.args[1] == 0), None)
        else:
            continue
        if feeds is not None and len(feeds.users) == 1 and next(iter(feeds.users)).target == ops.linear.default:
            count += 1
    return count


@pytest.mark.parametrize("name", ["hybrid", "nemotron_h", "gemma3", "llama"])
def test_fuse_norm_linear(name):
    model = build_model(name)
    gm = export_model(model, max_seq_len=64)
    run_pipeline(gm, BEFORE)
    expected = _norms_feeding_one_linear(gm)
    assert expected > 0
    ids = torch.randint(0, model.config.vocab_size, (1, 13), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(13)[None]
    with torch.no_grad():
        ref = gm(ids, pos)[0]
    info = run_pipeline(gm, ["fuse_norm_linear"])[0]
    counts = op_counts(gm)
    assert info.num_matches == expected
    assert counts[ops.rms_norm_linear.default] + counts[ops.fused_add_rms_norm_linear.default] == expected
    assert _norms_feeding_one_linear(gm) == 0
    with torch.no_grad():
        torch.testing.assert_close(gm(ids, pos)[0], ref, atol=0, rtol=0)


@pytest.mark.parametrize("name,pairs", [("gemma3", 2 * 6 - 1), ("gemma2", 2 * 4 - 1), ("llama", 0)])
def test_fuse_norm_add_norm(name, pairs):
    """Gemma's post-block norms feed the next residual add + norm: two per layer fused (the last
    layer's second feeds a plain add before the final norm), none in a model without them; float32
    logits unchanged (the op is the two ops on the CPU)."""
    model = build_model(name)
    gm = export_model(model, max_seq_len=64)
    run_pipeline(gm, ["match_attention", "match_rope", "match_rms_norm"])
    ids = torch.randint(0, model.config.vocab_size, (1, 13), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(13)[None]
    with torch.no_grad():
        ref = gm(ids, pos)[0]
    before = op_counts(gm)
    info = run_pipeline(gm, ["fuse_norm_add_norm"])[0]
    after = op_counts(gm)
    assert info.num_matches == after[ops.rms_norm_add_rms_norm.default] == pairs
    assert after[ops.rms_norm.default] == before[ops.rms_norm.default] - pairs
    assert after[ops.fused_add_rms_norm.default] == before[ops.fused_add_rms_norm.default] - pairs
    with torch.no_grad():
        torch.testing.assert_close(gm(ids, pos)[0], ref, atol=0, rtol=0)


@pytest.mark.parametrize("name,layers", [("gemma3", 6), ("llama", 0)])
def test_fuse_norm_rope(name, layers):
    """Gemma 3's q/k norms and RoPE: one op per attention layer, none where there are no q/k norms;
    float32 logits unchanged (the op is the three ops on the CPU)."""
    model = build_model(name)
    gm = export_model(model, max_seq_len=64)
    run_pipeline(gm, ["match_attention", "match_rope", "match_rms_norm"])
    ids = torch.randint(0, model.config.vocab_size, (1, 13), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(13)[None]
    with torch.no_grad():
        ref = gm(ids, pos)[0]
    before = op_counts(gm)
    info = run_pipeline(gm, ["fuse_norm_rope"])[0]
    after = op_counts(gm)
    assert info.num_matches == after[ops.rms_norm_rope.default] == layers
    assert after[ops.rope.default] == before[ops.rope.default] - layers
    assert after[ops.rms_norm.default] == before[ops.rms_norm.default] - 2 * layers
    with torch.no_grad():
        torch.testing.assert_close(gm(ids, pos)[0], ref, atol=0, rtol=0)
