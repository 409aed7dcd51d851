"""The flashinfer SSM backend's lane split: plain decode lanes through the single-token decode
kernel, every other lane through the Triton scan told to skip them. On the CPU the decode kernel is
``selective_state_update_reference`` (flashinfer's argument conventions, in torch) and Triton runs
in its interpreter; the GPU run (tests/test_gpu.py) uses flashinfer's own kernel. Oracle: the torch
backend on identical inputs — outputs, every slot's state, the replay buffers."""

import pytest
import torch

pytest.importorskip("triton")

from test_triton_ssd_scan import MIXED, TORCH, assert_close_scaled, make_step  # noqa: E402

from autodeploy.custom_ops import triton_ssd_scan  # noqa: E402,F401
from autodeploy.custom_ops.flashinfer_ssd_scan import (  # noqa: E402
    PAD_SLOT,
    decode_lane_inputs,
    scan_with_decode_kernel,
    selective_state_update_reference,
)

MUTABLE = ("ssm_state", "replay_x", "replay_dt", "replay_B")
DECODES = [(1, 7, 1, 0, False), (1, 12, 2, 0, False), (0, 0, 0, 0, False), (1, 30, 3, 0, False)]


def _check(lanes, seed, dt_min=0.0, dt_max=float("inf"), calls=None, num_slots=None):
    args, meta = make_step(lanes, seed=seed, num_slots=num_slots or len(lanes))  # the engine: a slot per lane
    ref = {k: (v.clone() if k in MUTABLE and v is not None else v) for k, v in args.items()}
    opts = (True, dt_min, dt_max, 4)
    expected = TORCH(*ref.values(), *meta, *opts)

    def kernel(*a, **kw):
        if calls is not None:
            calls.append(kw["state_batch_indices"].tolist())
        return selective_state_update_reference(*a, **kw)

    y = scan_with_decode_kernel(kernel, *args.values(), *meta, *opts)
    assert y.shape == expected.shape and y.dtype == expected.dtype
    assert_close_scaled(y, expected, 1e-5)
    for name in MUTABLE:
        assert_close_scaled(args[name], ref[name], 1e-5)
    return meta


def test_decode_lanes_are_the_plain_ones_with_their_inputs():
    args, meta = make_step(MIXED, seed=0)
    cu, has_state, replay_lens, is_verify = meta
    x, dt, B, C = (args[k][..., 1:] if k == "x" else args[k] for k in ("x", "dt", "B", "C"))  # x strided
    plain, state_idx, out_rows, x_d, dt_d, B_d, C_d = decode_lane_inputs(x, dt, B, C, args["slots"], *meta)
    # MIXED: only lane 2 (one token, cached, nothing to replay, not verifying) is plain decode; lane 5
    # has one token but replays 2 first
    assert plain.tolist() == [False, False, True, False, False, False, False, False, False, False]
    token = int(cu[2])
    assert state_idx.tolist() == [PAD_SLOT] * 2 + [int(args["slots"][2])] + [PAD_SLOT] * 7
    assert out_rows.tolist() == [x.shape[1]] * 2 + [token] + [x.shape[1]] * 7
    for got, src in ((x_d, x), (dt_d, dt), (B_d, B), (C_d, C)):
        assert torch.equal(got[2], src[0, token]) and torch.equal(got[0], src[0, 0])


def test_mixed_step_matches_the_oracle():
    calls = []
    _check(MIXED, seed=1, calls=calls)
    # the decode kernel ran over every lane, all but the plain one pointed at the pad slot
    assert calls == [[-1, -1, 3, -1, -1, -1, -1, -1, -1, -1]]


def test_all_decode_step_matches_the_oracle():
    calls = []
    _check(DECODES, seed=2, calls=calls)
    assert calls == [[1, 2, -1, 3]]


def test_more_lanes_than_state_slots_route_everything_to_triton():
    calls = []
    _check(MIXED, seed=4, calls=calls, num_slots=len(MIXED) - 1)  # flashinfer's kernel would refuse the shapes
    assert calls == []


def test_dt_limits_route_everything_to_triton():
    calls = []
    _check(MIXED, seed=3, dt_min=0.05, dt_max=0.6, calls=calls)  # the decode kernel does not clamp dt
    assert calls == []
