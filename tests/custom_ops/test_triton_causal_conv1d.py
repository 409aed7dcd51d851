"""autodeploy::triton_cached_causal_conv1d against the torch backend (the oracle) on identical inputs.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py switches it on before
anything imports triton). Sizes are tiny: the interpreter executes every program in numpy. Every comparison
covers the outputs and both mutated buffers (conv_state, replay_conv), all slots included.
"""

import pytest
import torch

from helpers import DEVICE

pytest.importorskip("triton")

from autodeploy.custom_ops.triton_causal_conv1d import triton_cached_causal_conv1d  # noqa: E402, F401

TRITON = torch.ops.autodeploy.triton_cached_causal_conv1d.default
TORCH = torch.ops.autodeploy.torch_cached_causal_conv1d.default
PREPARE = torch.ops.autodeploy.prepare_ssm_metadata.default
NUM_SLOTS = 9
CAPACITY = 3  # replay buffer: 1 + K tokens per slot, K = 2 drafts

# One lane of each kind (seq_len, cached_len, slot, accepted, verify):
MIXED = [
    (21, 0, 1, 0, False),  # prefill from zeros, longer than one token block
    (4, 9, 2, 0, False),  # continuing prefill chunk
    (1, 30, 3, 0, False),  # decode
    (3, 12, 4, 0, True),  # verify: last token + 2 drafts
    (1, 15, 5, 2, False),  # replay 2 accepted tokens, then decode
    (3, 7, 6, 3, True),  # replay 3, then verify
    (0, 8, 7, 1, False),  # replay only, no tokens
    (0, 0, 0, 0, False),  # padded lane: null slot, nothing to do
    (2, 5, 8, 0, False),  # short extend (fewer tokens than k - 1 for k = 4)
]


@pytest.fixture(autouse=True)
def _exact_float32_oracle():
    # the oracle's F.conv1d may run in TF32 under cuDNN; the float32 comparisons want full precision
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = allowed


def make_step(lanes, channels, width, dtype=torch.float32, x_dtype=None, bias=True, replay=True, seed=0):
    """Random x, weight, bias and caches for ``lanes``, with the prepare op's metadata."""
    g = torch.Generator().manual_seed(seed)
    seq_lens, cached_lens, slots, accepted, verify = (torch.tensor(col) for col in zip(*lanes))
    ids = torch.zeros(1, int(seq_lens.sum()), dtype=torch.long)
    meta = PREPARE(ids, seq_lens.int(), cached_lens.int(), accepted.int(), verify)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt).to(DEVICE)

    x = rand(1, channels, ids.shape[1], dt=x_dtype or dtype)
    weight, b = rand(channels, width), rand(channels) if bias else None
    conv_state = rand(NUM_SLOTS, channels, width - 1)
    replay_conv = rand(NUM_SLOTS, CAPACITY, channels) if replay else None
    return x, weight, b, conv_state, replay_conv, slots.int().to(DEVICE), [m.to(DEVICE) for m in meta]


def run_both(step, activation, atol=1e-6, rtol=1e-6, state_rtol=0.0):
    """Run both backends on clones of the caches; return the Triton results (out, conv_state, replay).

    States and replay buffers are copies of inputs: bit-exact unless ``state_rtol`` allows rounding."""
    x, weight, bias, conv_state, replay_conv, slots, meta = step

    def clone(t):
        return None if t is None else t.clone()

    state_t, replay_t = clone(conv_state), clone(replay_conv)
    state, replay = clone(conv_state), clone(replay_conv)
    expected = TORCH(x, weight, bias, activation, state_t, replay_t, slots, *meta)
    out = TRITON(x, weight, bias, activation, state, replay, slots, *meta)
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(state, state_t, atol=0.0, rtol=state_rtol)
    if replay is not None:
        torch.testing.assert_close(replay, replay_t, atol=0.0, rtol=state_rtol)
    return out, state, replay


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("activation", ["", "silu"])
def test_mixed_step_float32(width, activation):
    run_both(make_step(MIXED, channels=40, width=width, seed=width), activation)


def test_several_channel_blocks_swish_no_bias():
    # 72 channels: two channel blocks in the output kernel (64 each), a partial one at the end
    run_both(make_step(MIXED, channels=72, width=4, bias=False, seed=3), "swish")


def test_mutations_are_the_expected_ones():
    # padded lane and unused slot untouched; verify lanes keep the state they had after the replay
    x, _, _, conv_state, replay_conv, _, _ = step = make_step(MIXED, channels=8, width=4, seed=5)
    _, state, replay = run_both(step, "silu")
    assert torch.equal(state[0], conv_state[0]) and torch.equal(replay[0], replay_conv[0])
    assert torch.equal(state[4], conv_state[4])  # verify, no replay
    assert torch.equal(replay[4], x[0, :, 26:29].T)  # its 3 inputs (tokens 26..28) stored
    assert torch.equal(state[6], replay_conv[6].T)  # replay of 3 = k - 1 columns replaces the state
    assert torch.equal(state[7], torch.cat([conv_state[7, :, 1:], replay_conv[7, :1].T], dim=1))


def test_decode_only_and_no_replay_buffer():
    lanes = [(1, 4, 2, 0, False), (0, 0, 0, 0, False), (1, 1, 1, 0, False), (5, 0, 3, 0, False)]
    run_both(make_step(lanes, channels=16, width=4, replay=False, seed=7), "silu")


def test_bfloat16():
    # states and replay buffers are bit-exact copies; outputs: the kernel sums in float32 and rounds
    # once to bf16 before the activation, the oracle convolves in bf16: compare at bf16 resolution
    run_both(make_step(MIXED, channels=40, width=4, dtype=torch.bfloat16, seed=11), "silu", atol=2e-2, rtol=2e-2)
    # float32 activations with bf16 weights and caches: the window is taken through the weight's dtype.
    # Triton 3.9's interpreter truncates float32 -> bf16 (GPUs round to nearest even): allow 1 bf16 ulp
    run_both(make_step(MIXED, channels=24, width=4, dtype=torch.bfloat16, x_dtype=torch.float32, seed=12),
             "", atol=2e-2, rtol=2e-2, state_rtol=0.0 if DEVICE == "cuda" else 2 ** -7)


@pytest.mark.parametrize("width", [2, 4])
def test_replay_equals_direct_commit(width):
    """Verify 3 tokens, accept 2, then decode: same state and outputs as committing the 2 directly."""
    _, weight, bias, conv_state, replay_conv, _, _ = make_step(MIXED, channels=8, width=width, seed=13)
    tokens = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    verified, accepted, nxt = tokens[:, :, :3], tokens[:, :, :2], tokens[:, :, 3:]

    def step(x, lane):
        seq_len, cached, slot, acc, verify = lane
        ids = torch.zeros(1, seq_len, dtype=torch.long)
        meta = PREPARE(ids, *(torch.tensor([v]).int() for v in (seq_len, cached, acc)), torch.tensor([verify]))
        return TRITON(x, weight, bias, "silu", state, replay, torch.tensor([slot]).int().to(DEVICE),
                      *[m.to(DEVICE) for m in meta])

    state, replay = conv_state.clone(), replay_conv.clone()
    step(verified, (3, 10, 5, 0, True))
    via_replay = step(nxt, (1, 12, 5, 2, False))
    replayed_state = state[5].clone()

    state, replay = conv_state.clone(), replay_conv.clone()
    step(accepted, (2, 10, 5, 0, False))
    direct = step(nxt, (1, 12, 5, 0, False))
    assert torch.equal(via_replay, direct) and torch.equal(replayed_state, state[5])


def test_capacity_violations_stay_in_the_lanes_slot():
    """Metadata outside the contract: the oracle raises ValueError (it syncs to check). The Triton
    op cannot raise without a sync or extra kernels in every layer: its replay-buffer accesses are
    masked, so it writes nothing outside the lane's slot, and checked mode's check_ssm_metadata
    (one per step) names the violation."""
    from autodeploy.custom_ops.checks import check_ssm_metadata

    for lane in [(1, 5, 1, CAPACITY + 1, False), (CAPACITY + 1, 5, 1, 0, True), (1, 0, 1, 1, False)]:
        x, weight, bias, conv_state, replay_conv, slots, meta = make_step([lane], channels=8, width=4)
        with pytest.raises(ValueError):
            TORCH(x, weight, bias, "", conv_state.clone(), replay_conv.clone(), slots, *meta)
        state0, replay0 = conv_state.clone(), replay_conv.clone()
        TRITON(x, weight, bias, "", conv_state, replay_conv, slots, *meta)
        others = torch.arange(conv_state.shape[0], device=conv_state.device) != 1
        assert torch.equal(conv_state[others], state0[others]) and torch.equal(replay_conv[others], replay0[others])
        if DEVICE != "cuda":  # a device-side assert ends the CUDA context of the process
            with pytest.raises(RuntimeError, match="replay buffer|no cached state"):
                check_ssm_metadata(slots, *meta, conv_state, CAPACITY)


def test_replay_only_step_activation_check_and_opcheck():
    lanes = [(0, 6, 1, 2, False), (0, 0, 0, 0, False), (0, 3, 2, 3, False)]  # no tokens at all
    out, _, _ = run_both(make_step(lanes, channels=8, width=4, seed=17), "silu")
    assert out.shape == (1, 8, 0)
    x, weight, bias, conv_state, replay_conv, slots, meta = make_step(MIXED[3:6], channels=8, width=4, seed=19)
    with pytest.raises(ValueError, match="activation"):
        TRITON(x, weight, bias, "gelu", conv_state, replay_conv, slots, *meta)
    torch.library.opcheck(TRITON, (x, weight, bias, "silu", conv_state, replay_conv, slots, *meta))


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_capture():
    # no host sync inside the op: it captures, and a replay on new inputs matches the oracle
    x, weight, bias, conv_state, replay_conv, slots, meta = make_step(MIXED, channels=40, width=4, seed=23)
    state0, replay0 = conv_state.clone(), replay_conv.clone()
    TRITON(x, weight, bias, "silu", conv_state, replay_conv, slots, *meta)  # compiles the kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = TRITON(x, weight, bias, "silu", conv_state, replay_conv, slots, *meta)
    x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))
    conv_state.copy_(state0)
    replay_conv.copy_(replay0)
    graph.replay()
    state_t, replay_t = state0.clone(), replay0.clone()
    expected = TORCH(x, weight, bias, "silu", state_t, replay_t, slots, *meta)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(conv_state, state_t) and torch.equal(replay_conv, replay_t)
