"""autodeploy::triton_cached_ssd_scan against the torch backend (the oracle) on identical inputs.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py switches it on before
anything imports triton). Sizes are tiny: the interpreter executes every program in numpy. Each step mixes lane
kinds; both token paths of the kernel (token by token, chunked) run every case.
"""

import pytest
import torch

from helpers import DEVICE

pytest.importorskip("triton")

from autodeploy.custom_ops import triton_ssd_chunks, triton_ssd_scan  # noqa: E402
from autodeploy.custom_ops.torch_cached_ssm import torch_cached_ssd_scan  # noqa: E402, F401

TRITON = torch.ops.autodeploy.triton_cached_ssd_scan.default
TORCH = torch.ops.autodeploy.torch_cached_ssd_scan.default
PREPARE = torch.ops.autodeploy.prepare_ssm_metadata.default
NUM_SLOTS, CAPACITY = 9, 4  # slot 0 is the null slot of padded lanes; replay buffers hold 1 + K = 4

# Lanes: (new tokens, cached tokens, slot, accepted = replay length, verify).
MIXED = [
    (37, 0, 1, 0, False),   # fresh prefill over several chunks (tile of 16), last one partial
    (21, 20, 2, 0, False),  # continuing prefill chunk, longer than a chunk
    (1, 7, 3, 0, False),    # decode
    (0, 0, 0, 0, False),    # padded
    (3, 9, 4, 0, True),     # verify
    (1, 12, 5, 2, False),   # replay, then decode
    (4, 15, 6, 3, True),    # replay, then verify (reads the old buffer, then overwrites it)
    (0, 30, 7, 1, False),   # replay only
    (0, 0, 0, 0, False),    # padded
    (2, 3, 8, 0, False),    # short extend
]

# Which path takes a lane's tokens: all token by token, the kernel's default, all chunked, and
# the chunk-parallel launches for lanes of >= 20 tokens from a committed state (MIXED's fresh
# 37-token prefill: chunks of 12, 12, 12, 1; its continuing 21-token chunk: 12, 9), in chunks of
# 12 tokens, which the 16-token tiles cover partially.
PATHS = {"recurrent": 10**9, "default": triton_ssd_scan.CHUNKED_MIN_TOKENS, "chunked": 1, "parallel": 1}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    monkeypatch.setattr(triton_ssd_scan, "CHUNKED_MIN_TOKENS", PATHS[request.param])
    if request.param == "parallel":
        monkeypatch.setattr(triton_ssd_chunks, "PARALLEL_MIN_TOKENS", 20)
        monkeypatch.setattr(triton_ssd_chunks, "PARALLEL_CHUNK", 12)
    return request.param


def make_step(lanes, h=4, p=8, n=8, g=2, dtype=torch.float32, seed=0, with_D=True, with_bias=True,
              replay=True, num_slots=NUM_SLOTS):
    """Random inputs, a random state in every slot (the null slot too) and random replay buffers,
    plus the prepare op's metadata for ``lanes``."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(dt).to(DEVICE)

    seq_lens, cached, slots, accepted, verify = (torch.tensor(c) for c in zip(*lanes))
    T = int(seq_lens.sum())
    meta = PREPARE(torch.zeros(1, T, dtype=torch.long), seq_lens.int(), cached.int(), accepted.int(), verify)
    args = dict(
        x=rand(1, T, h, p), dt=rand(1, T, h, scale=0.7), A=-(torch.rand(h, generator=gen) * 1.5 + 0.1).to(DEVICE),
        B=rand(1, T, g, n), C=rand(1, T, g, n),
        D=rand(h, dt=torch.float32) if with_D else None,
        dt_bias=rand(h, scale=0.5, dt=torch.float32) if with_bias else None,
        ssm_state=rand(num_slots, h, p, n, dt=torch.float32),
        replay_x=rand(num_slots, CAPACITY, h, p) if replay else None,
        replay_dt=rand(num_slots, CAPACITY, h, scale=0.7) if replay else None,
        replay_B=rand(num_slots, CAPACITY, g, n) if replay else None,
        slots=slots.int().to(DEVICE),
    )
    return args, [m.to(DEVICE) for m in meta]


def assert_close_scaled(actual, expected, tol):
    """Elementwise |a - e| <= tol * (|e| + max|e|): relative to the tensor's magnitude."""
    scale = expected.float().abs().max().clamp_min(1e-6) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


def check_against_torch(step, dt_softplus=True, dt_min=0.0, dt_max=float("inf"), chunk_size=4, y_tol=1e-5,
                        state_tol=1e-5):
    args, meta = step
    mutable = ("ssm_state", "replay_x", "replay_dt", "replay_B")
    ref = {k: (v.clone() if k in mutable and v is not None else v) for k, v in args.items()}
    opts = (dt_softplus, dt_min, dt_max, chunk_size)
    expected = TORCH(*ref.values(), *meta, *opts)
    y = TRITON(*args.values(), *meta, *opts)
    assert y.dtype == expected.dtype and y.shape == expected.shape
    assert_close_scaled(y, expected, y_tol)
    assert_close_scaled(args["ssm_state"], ref["ssm_state"], state_tol)
    for name in mutable[1:]:
        if args[name] is not None:
            assert torch.equal(args[name], ref[name]), name  # plain copies of the inputs
    return y, args


def test_mixed_step(path):
    y, args = check_against_torch(make_step(MIXED, seed=1))
    assert y.abs().max() > 0 and torch.isfinite(y).all()


@pytest.mark.parametrize("dt_softplus,with_D,with_bias,dt_min,dt_max", [
    (True, True, True, 0.0, float("inf")),
    (False, False, False, 0.0, float("inf")),  # raw dt (|.| keeps it non-negative below), no D, no bias
    (True, False, True, 0.05, 0.6),            # both dt limits bind
    (False, True, False, 0.01, 0.3),
])
def test_dt_options_and_optional_inputs(path, dt_softplus, with_D, with_bias, dt_min, dt_max):
    args, meta = make_step(MIXED, seed=2, with_D=with_D, with_bias=with_bias)
    if not dt_softplus:
        args["dt"], args["replay_dt"] = args["dt"].abs(), args["replay_dt"].abs()
    check_against_torch((args, meta), dt_softplus, dt_min, dt_max, chunk_size=8)


def test_odd_sizes_several_head_dim_blocks(path):
    # head_dim 20 = two 16-row blocks, the second partial; d_state 12 padded to 16; one group
    step = make_step(MIXED, h=3, p=20, n=12, g=1, seed=3)
    check_against_torch(step, chunk_size=8)


def test_bfloat16(path):
    # dt is discretized with bf16 rounding in both backends and x, B, C are exact in float32, so the
    # float32 states agree closely; y is rounded to bf16: allow a flip of its last bit
    step = make_step(MIXED, dtype=torch.bfloat16, seed=4)
    check_against_torch(step, y_tol=2**-8, state_tol=1e-5)


def test_without_replay_buffers(path):
    lanes = [(9, 0, 1, 0, False), (0, 0, 0, 0, False), (1, 5, 2, 0, False), (25, 4, 3, 0, False)]
    args, (cu, has_state, replay_lens, is_verify) = make_step(lanes, seed=5, replay=False)
    check_against_torch((args, (cu, has_state.int(), replay_lens, is_verify.long())))  # integer flags too


def test_replay_equals_commit(path):
    """Verify 3 tokens, accept 2 and replay them: same state as committing the 2, and the verify
    step's outputs are the committing step's outputs."""
    args, _ = make_step([(3, 5, 1, 0, True)], seed=6)
    opts = (True, 0.0, float("inf"), 4)
    state0 = args["ssm_state"].clone()

    def run(lanes, **tokens):
        seq_lens, cached, slots, accepted, verify = (torch.tensor(c) for c in zip(*lanes))
        T = int(seq_lens.sum())
        meta = PREPARE(torch.zeros(1, T, dtype=torch.long), seq_lens.int(), cached.int(), accepted.int(), verify)
        step = {**args, **tokens, "slots": slots.int().to(DEVICE)}
        return TRITON(*step.values(), *[m.to(DEVICE) for m in meta], *opts)

    first_two = {k: args[k][:, :2] for k in ("x", "dt", "B", "C")}
    y_verify = run([(3, 5, 1, 0, True)])
    assert torch.equal(args["ssm_state"], state0)  # verify does not advance the state
    run([(0, 8, 1, 2, False)], **{k: v[:, :0] for k, v in first_two.items()})  # replay only
    replayed = args["ssm_state"][1].clone()

    args["ssm_state"].copy_(state0)
    y_commit = run([(2, 5, 1, 0, False)], **first_two)
    assert_close_scaled(replayed, args["ssm_state"][1], 1e-5)
    assert_close_scaled(y_verify[:, :2], y_commit, 1e-5)
    assert not torch.allclose(replayed, state0[1])


def test_overlong_verify_and_replay_are_clipped():
    # Malformed metadata the oracle rejects (it syncs to check); the kernel cannot raise, so it clips
    # to the buffers' capacity and writes nothing outside the lane's slot.
    args, meta = make_step([(CAPACITY + 2, 3, 1, 0, True), (1, 2, 2, CAPACITY + 3, False)], seed=9)
    opts = (True, 0.0, float("inf"), 4)
    with pytest.raises(ValueError, match="replay buffer holds"):
        TORCH(*{k: (v.clone() if k.startswith(("ssm", "replay")) else v) for k, v in args.items()}.values(),
              *meta, *opts)
    before = {k: args[k].clone() for k in ("ssm_state", "replay_x", "replay_dt", "replay_B")}
    # the second lane alone, replaying the whole buffer: what the clipped replay must give
    lane2 = {**{k: (v.clone() if k.startswith(("ssm", "replay")) else v) for k, v in args.items()},
             **{k: args[k][:, CAPACITY + 2:] for k in ("x", "dt", "B", "C")}, "slots": args["slots"][1:]}
    one_lane = (torch.tensor([v], dtype=torch.int32) for v in (1, 2, CAPACITY))  # tokens, cached, replay
    lane2_meta = PREPARE(torch.zeros(1, 1, dtype=torch.long), *one_lane, torch.tensor([False]))
    y2 = TORCH(*lane2.values(), *[m.to(DEVICE) for m in lane2_meta], *opts)

    y = TRITON(*args.values(), *meta, *opts)
    assert_close_scaled(y[:, CAPACITY + 2:], y2, 1e-5)
    assert_close_scaled(args["ssm_state"][2], lane2["ssm_state"][2], 1e-5)
    assert torch.equal(args["replay_x"][1], args["x"][0, :CAPACITY])
    assert torch.equal(args["replay_dt"][1], args["dt"][0, :CAPACITY])
    assert torch.equal(args["replay_B"][1], args["B"][0, :CAPACITY])
    for name, old in before.items():
        untouched = [s for s in range(NUM_SLOTS) if s != (2 if name == "ssm_state" else 1)]
        assert torch.equal(args[name][untouched], old[untouched]), name


def test_empty_step_and_opcheck():
    # no tokens at all, one lane replays: the state still advances
    check_against_torch(make_step([(0, 6, 2, 3, False), (0, 0, 0, 0, False)], seed=7))
    check_against_torch(make_step([(0, 0, 0, 0, False)], seed=7))
    args, meta = make_step([(2, 0, 1, 0, False), (1, 4, 2, 1, False), (2, 3, 3, 0, True)], seed=8)
    torch.library.opcheck(TRITON, (*args.values(), *meta, True, 0.0, float("inf"), 4))
