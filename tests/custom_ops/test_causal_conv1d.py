"""autodeploy::causal_conv1d against a float64 loop and transformers' torch path."""

import pytest
import torch
import torch.nn.functional as F

import autodeploy  # noqa: F401


def loop_reference(x, weight, bias, activation):
    x, weight = x.double(), weight.double()
    b, c, s = x.shape
    k = weight.shape[1]
    out = torch.zeros(b, c, s, dtype=torch.float64)
    for t in range(s):
        for j in range(k):  # weight[:, k-1] multiplies the current step
            src = t - (k - 1 - j)
            if src >= 0:
                out[:, :, t] += weight[:, j] * x[:, :, src]
    if bias is not None:
        out += bias.double()[:, None]
    return F.silu(out) if activation == "silu" else out


@pytest.mark.parametrize("activation", ["", "silu"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("seq", [1, 3, 17])
def test_conv_matches_loop(activation, with_bias, seq):
    torch.manual_seed(seq)
    x, w = torch.randn(2, 6, seq), torch.randn(6, 4)
    bias = torch.randn(6) if with_bias else None
    out = torch.ops.autodeploy.causal_conv1d(x, w, bias, activation)
    torch.testing.assert_close(out.double(), loop_reference(x, w, bias, activation), atol=1e-5, rtol=1e-5)


def test_matches_transformers():
    from transformers.models.mamba2.modeling_mamba2 import causal_conv1d_fn

    torch.manual_seed(0)
    x, w, bias = torch.randn(2, 6, 13), torch.randn(6, 4), torch.randn(6)
    torch.testing.assert_close(torch.ops.autodeploy.causal_conv1d(x, w, bias, "silu"),
                               causal_conv1d_fn(x, w, bias, activation="silu"))


def test_unknown_activation_is_an_error():
    with pytest.raises(ValueError, match="unsupported conv activation 'gelu'"):
        torch.ops.autodeploy.causal_conv1d(torch.randn(1, 2, 3), torch.randn(2, 4), None, "gelu")


def test_opcheck():
    torch.library.opcheck(torch.ops.autodeploy.causal_conv1d.default,
                          (torch.randn(2, 6, 5), torch.randn(6, 4), torch.randn(6), "silu"))
