"""autodeploy::ssd_scan against a float64 step-by-step recurrence and transformers' torch path."""

import pytest
import torch
import torch.nn.functional as F

import autodeploy  # noqa: F401


def recurrence(x, dt, A, B, C, D=None, dt_bias=None, init=None, softplus=False, lo=0.0, hi=float("inf")):
    """S_t = exp(dt A) S_{t-1} + dt x_t B_t^T ; y_t = S_t C_t + D x_t, one step at a time in float64."""
    x, dt, A, B, C = x.double(), dt.double(), A.double(), B.double(), C.double()
    b, s, h, p = x.shape
    g, n = B.shape[2:]
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(lo, hi)
    state = init.double().clone() if init is not None else torch.zeros(b, h, p, n, dtype=torch.float64)
    y = torch.zeros_like(x)
    for t in range(s):
        for head in range(h):
            grp = head // (h // g)
            decay = torch.exp(dt[:, t, head] * A[head])[:, None, None]
            state[:, head] = decay * state[:, head] + dt[:, t, head][:, None, None] * (
                x[:, t, head][:, :, None] * B[:, t, grp][:, None, :]
            )
            y[:, t, head] = torch.einsum("bpn,bn->bp", state[:, head], C[:, t, grp])
    if D is not None:
        y = y + x * D.double()[:, None]
    return y, state


def make_inputs(b=2, s=21, h=4, p=3, g=2, n=5, seed=0):
    torch.manual_seed(seed)
    return dict(
        x=torch.randn(b, s, h, p), dt=torch.randn(b, s, h) * 0.5, A=-torch.rand(h) * 2 - 0.1,
        B=torch.randn(b, s, g, n), C=torch.randn(b, s, g, n), D=torch.randn(h), dt_bias=torch.randn(h) * 0.3,
    )


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 16, 64])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_scan_matches_recurrence(chunk_size, with_init, groups):
    t = make_inputs(g=groups, seed=chunk_size + groups)
    init = torch.randn(2, 4, 3, 5) if with_init else None
    y, state = torch.ops.autodeploy.ssd_scan(
        t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["dt_bias"], init, True, 0.0, float("inf"), chunk_size
    )
    y_ref, state_ref = recurrence(**t, init=init, softplus=True)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state.double(), state_ref, atol=1e-4, rtol=1e-4)
    assert state.dtype == torch.float32


def test_dt_limits_and_no_optional_inputs():
    t = make_inputs(seed=3)
    y, state = torch.ops.autodeploy.ssd_scan(
        t["x"], t["dt"], t["A"], t["B"], t["C"], None, None, None, False, 0.05, 0.4, 8
    )
    y_ref, state_ref = recurrence(t["x"], t["dt"], t["A"], t["B"], t["C"], lo=0.05, hi=0.4)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state.double(), state_ref, atol=1e-4, rtol=1e-4)


def test_split_scan_continues_from_state():
    """Scanning a sequence in two pieces, the second from the first's final state, equals one scan."""
    t = make_inputs(s=30, seed=4)

    def args(sl, init):
        return (t["x"][:, sl], t["dt"][:, sl], t["A"], t["B"][:, sl], t["C"][:, sl], t["D"], t["dt_bias"], init, True,
                0.0, float("inf"), 8)

    y_all, s_all = torch.ops.autodeploy.ssd_scan(*args(slice(0, 30), None))
    y1, s1 = torch.ops.autodeploy.ssd_scan(*args(slice(0, 13), None))
    y2, s2 = torch.ops.autodeploy.ssd_scan(*args(slice(13, 30), s1))
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, s_all, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_matches_transformers_chunk_scan(chunk_size):
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    t = make_inputs(seed=5)
    init = torch.randn(2, 4, 3, 5)
    y_hf, s_hf = mamba2_chunk_scan(
        t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size, D=t["D"], dt_bias=t["dt_bias"],
        initial_states=init, dt_softplus=True, dt_limit=(0.0, float("inf")), return_final_states=True,
    )
    y, s = torch.ops.autodeploy.ssd_scan(
        t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["dt_bias"], init, True, 0.0, float("inf"), chunk_size
    )
    torch.testing.assert_close(y.float(), y_hf, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(s, s_hf, atol=2e-5, rtol=2e-5)


def test_opcheck():
    t = make_inputs(s=9, seed=6)
    init = torch.randn(2, 4, 3, 5)
    torch.library.opcheck(
        torch.ops.autodeploy.ssd_scan.default,
        (t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["dt_bias"], init, True, 0.0, float("inf"), 4),
    )
