"""match_linear: every ``aten.linear`` of an exported model becomes ``autodeploy::linear`` (as
many as the model has Linear modules, with their biases), and the logits stay those of the
untransformed graph (float32: the op is F.linear on the CPU)."""

import pytest
import torch

from autodeploy import export_model
from autodeploy.models import build_model
from autodeploy.transforms import run_pipeline
from helpers import op_counts


@pytest.mark.parametrize("name", ["hybrid", "llama"])
def test_match_linear_replaces_every_linear(name):
    model = build_model(name)
    gm = export_model(model, max_seq_len=64)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    before = op_counts(gm)[torch.ops.aten.linear.default]
    assert before == linears
    ids = torch.randint(0, model.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(11)[None]
    with torch.no_grad():
        ref = gm(ids, pos)[0]
    info = run_pipeline(gm, ["match_linear"])[0]
    counts = op_counts(gm)
    assert info.num_matches == counts[torch.ops.autodeploy.linear.default] == linears
    assert counts[torch.ops.aten.linear.default] == 0
    with torch.no_grad():
        torch.testing.assert_close(gm(ids, pos)[0], ref, atol=0, rtol=0)


def test_match_linear_keeps_the_bias():
    class Biased(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 5)

        def forward(self, x):
            return self.proj(x)

    module = Biased()
    x = torch.randn(2, 8)
    gm = torch.export.export(module, (x,)).module()
    run_pipeline(gm, ["match_linear"])
    node = next(n for n in gm.graph.nodes if n.target == torch.ops.autodeploy.linear.default)
    assert node.args[2] is not None
    torch.testing.assert_close(gm(x), module(x))


def test_a_weight_computed_in_the_graph_keeps_aten_linear():
    """The one-row kernel may read its weights before the previous kernel finishes: only constant
    weights (parameters) are rewritten, a weight the graph computes is left to aten.linear."""
    class Computed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.scale = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return torch.nn.functional.linear(self.proj(x), self.scale * 2)

    module = Computed()
    x = torch.randn(2, 8)
    gm = torch.export.export(module, (x,)).module()
    info = run_pipeline(gm, ["match_linear"])[0]
    counts = op_counts(gm)
    assert info.num_matches == counts[torch.ops.autodeploy.linear.default] == 1
    assert counts[torch.ops.aten.linear.default] == 1
    torch.testing.assert_close(gm(x), module(x))
