"""export_model on every zoo model: canonical ops only, one per layer, logits unchanged."""

import sys

import pytest
import torch
import torch.nn as nn

from autodeploy import ExportError, export_model
from autodeploy.export import MAMBA_ROUTES, hub_kernel_name
from autodeploy.fx_utils import op_kwargs, op_nodes
from autodeploy.models import build_model, zoo_names
from helpers import (
    ATTENTION,
    CAUSAL_CONV1D,
    LEFTOVER_ATTENTION,
    SSD_SCAN,
    attention_layers,
    expected_windows,
    hf_logits,
    mamba_layers,
    op_counts,
)

# float32 logits of the exported graph vs the eager module (same weights): reordered reductions only
ATOL = 2e-5


@pytest.mark.parametrize("name", zoo_names())
def test_zoo_exports_to_canonical_ops(name):
    model = build_model(name)
    gm = export_model(model, max_seq_len=128)
    counts = op_counts(gm)
    assert counts[ATTENTION] == attention_layers(model)
    assert counts[SSD_SCAN] == mamba_layers(model)
    assert counts[CAUSAL_CONV1D] == mamba_layers(model)
    assert not any(counts[t] for t in LEFTOVER_ATTENTION)
    windows = [op_kwargs(n)["sliding_window"] for n in op_nodes(gm, ATTENTION)]
    assert windows == expected_windows(model)
    for length in (7, 53):  # 53 is longer than every zoo sliding window and several SSM chunks
        ids, pos, ref = hf_logits(model, length, seed=length)
        with torch.no_grad():
            out = gm(ids, pos)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_patches_are_undone_after_export():
    model = build_model("nemotron_h")
    module = sys.modules[type(model).__module__]
    before = {k: v for k, v in vars(module).items() if hub_kernel_name(v) in MAMBA_ROUTES}
    attn = model.config._attn_implementation
    export_model(model, max_seq_len=64)
    after = {k: v for k, v in vars(module).items() if hub_kernel_name(v) in MAMBA_ROUTES}
    assert before == after and len(before) == 5
    assert model.config._attn_implementation == attn


def test_entry_points_are_found_by_hub_kernel_name():
    from transformers.models.bamba import modeling_bamba

    assert hub_kernel_name(modeling_bamba.mamba2_chunk_scan) == "mamba_chunk_scan_combined"
    assert hub_kernel_name(modeling_bamba.causal_conv1d_fn) == "causal_conv1d_fn"
    assert hub_kernel_name(len) is None


class HandRolledMixer(nn.Module):
    """Looks like a Mamba2 mixer (A_log, conv1d) but calls no transformers entry point."""

    def __init__(self, d):
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(2))
        self.conv1d = nn.Conv1d(d, d, 4, groups=d, padding=3)

    def forward(self, x):
        return self.conv1d(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2) * torch.exp(self.A_log).sum()


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.mixer = HandRolledMixer(8)
        self.head = nn.Linear(8, 16)

    def forward(self, input_ids, position_ids, use_cache=False):
        return self.head(self.mixer(self.embed(input_ids)))


def test_unroutable_mamba_mixer_is_named():
    with pytest.raises(ExportError, match=r"mixer \(HandRolledMixer\)"):
        export_model(TinyLM(), max_seq_len=32)


def test_bad_max_seq_len():
    with pytest.raises(ValueError, match="max_seq_len"):
        export_model(TinyLM(), max_seq_len=1)


def test_graph_that_disagrees_with_the_model_is_refused():
    """The hybrid's sliding layer names its window only on the module (transformers passes no mask
    to a custom attention interface); without it the routed op would attend to everything. The
    build-time probe (longer than the window) must catch that instead of serving wrong tokens."""
    model = build_model("hybrid")
    sliding = model.model.layers[2].mixer
    assert sliding.sliding_window == model.config.sliding_window
    del sliding.sliding_window
    with pytest.raises(ExportError, match="disagrees with the model itself"):
        export_model(model, max_seq_len=128)
