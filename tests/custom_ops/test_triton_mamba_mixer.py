"""autodeploy::triton_cached_mamba_mixer against its oracles: the unfused torch backend chain (the
cached conv, the cached SSD scan, the gated RMSNorm reference) on identical inputs, and a float64
recurrence written out here for decode lanes.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py). Steps mix the fused
kernel's lanes (decodes, new one-token sequences, short prefill chunks, padding) with the lanes it
leaves to the existing kernels (long prefill chunks, verify lanes, replays).
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE

pytest.importorskip("triton")

from autodeploy.custom_ops import torch_cached_ssm, triton_mamba_mixer  # noqa: E402, F401
from autodeploy.custom_ops.rms_norm import rms_norm_reference  # noqa: E402

FUSED = torch.ops.autodeploy.triton_cached_mamba_mixer.default
COUNTERS = torch.ops.autodeploy.mamba_mixer_counters.default
CONV = torch.ops.autodeploy.torch_cached_causal_conv1d.default
SCAN = torch.ops.autodeploy.torch_cached_ssd_scan.default
PREPARE = torch.ops.autodeploy.prepare_ssm_metadata.default
NUM_SLOTS, CAPACITY = 9, 4

# (new tokens, cached tokens, slot, accepted = replay length, verify)
# decodes, a padded lane, a new one-token sequence
DECODE = [(1, 7, 3, 0, False), (0, 0, 0, 0, False), (1, 12, 5, 0, False), (1, 0, 2, 0, False)]
SHORT = [(1, 7, 3, 0, False), (5, 0, 1, 0, False), (3, 9, 4, 0, False), (0, 0, 0, 0, False), (2, 0, 0, 0, False)]
MIXED = [                    # with replay buffers: the fused kernel serves the decodes and the short chunk only
    (33, 0, 1, 0, False),    # a long prefill chunk (existing path)
    (1, 7, 3, 0, False),     # decode (fused)
    (3, 9, 4, 0, True),      # verify (existing path)
    (1, 12, 5, 2, False),    # replay, then decode (existing path)
    (4, 15, 6, 3, True),     # replay, then verify
    (0, 30, 7, 1, False),    # replay only
    (2, 3, 8, 0, False),     # short extend (fused)
    (0, 0, 0, 0, False),     # padded
]
SIZES = dict(h=4, p=8, g=2, n=8, k=4)


def make_step(lanes, h, p, g, n, k, dtype=torch.float32, replay=False, seed=0, bias=True, with_D=True,
              num_slots=NUM_SLOTS):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(dt).to(DEVICE)

    seq_lens, cached, slots, accepted, verify = (torch.tensor(c) for c in zip(*lanes))
    T = int(seq_lens.sum())
    meta = PREPARE(torch.zeros(1, T, dtype=torch.long), seq_lens.int(), cached.int(), accepted.int(), verify)
    c = h * p + 2 * g * n
    in_proj = rand(1, T, h * p + c + h + 3)  # the strided views the graph hands over: gate, xBC, dt
    return dict(
        xBC=in_proj[..., h * p:h * p + c].transpose(1, 2), dt=in_proj[..., h * p + c:h * p + c + h],
        gate=in_proj[..., :h * p], conv_weight=rand(c, k, scale=0.5), conv_bias=rand(c) if bias else None,
        activation="silu", A=-(torch.rand(h, generator=gen) + 0.2).to(DEVICE),
        D=rand(h, dt=torch.float32) if with_D else None, dt_bias=rand(h, scale=0.5, dt=torch.float32),
        norm_weight=rand(h * p), conv_state=rand(num_slots, c, k - 1),
        replay_conv=rand(num_slots, CAPACITY, c) if replay else None,
        ssm_state=rand(num_slots, h, p, n, dt=torch.float32),
        replay_x=rand(num_slots, CAPACITY, h, p) if replay else None,
        replay_dt=rand(num_slots, CAPACITY, h) if replay else None,
        replay_B=rand(num_slots, CAPACITY, g, n) if replay else None,
        slots=slots.int().to(DEVICE)), [m.to(DEVICE) for m in meta]


def options(h, p, g, n, norm_in=torch.float32, cast_first=True, out=torch.float32, dt_min=0.0, dt_max=float("inf")):
    return dict(num_heads=h, head_dim=p, n_groups=g, d_state=n, dt_softplus=True, dt_min=dt_min, dt_max=dt_max,
                chunk_size=8, norm_in_dtype=norm_in, eps=1e-5, weight_offset=0.0, cast_first=cast_first,
                out_dtype=out)


CACHES = ("conv_state", "replay_conv", "ssm_state", "replay_x", "replay_dt", "replay_B")


def run_fused(args, meta, opts):
    args = {k: (v.clone() if k in CACHES and v is not None else v) for k, v in args.items()}
    counters = COUNTERS(torch.zeros(1, args["xBC"].shape[-1], dtype=torch.long, device=DEVICE), 2, opts["n_groups"])
    out = FUSED(*args.values(), *meta, counters, 1, *opts.values())
    assert not counters.any(), "the counters end where they start, at zero"
    return out, args


def run_unfused(args, meta, opts):
    """The chain the transform replaces, on the torch backend."""
    a = {k: (v.clone() if k in CACHES and v is not None else v) for k, v in args.items()}
    h, p, g, n = (opts[k] for k in ("num_heads", "head_dim", "n_groups", "d_state"))
    T = a["xBC"].shape[-1]
    conv = CONV(a["xBC"], a["conv_weight"], a["conv_bias"], a["activation"], a["conv_state"], a["replay_conv"],
                a["slots"], *meta)
    x, B, C = conv.transpose(1, 2).split([h * p, g * n, g * n], dim=-1)
    y = SCAN(x.reshape(1, T, h, p), a["dt"], a["A"], B.reshape(1, T, g, n), C.reshape(1, T, g, n), a["D"],
             a["dt_bias"], a["ssm_state"], a["replay_x"], a["replay_dt"], a["replay_B"], a["slots"], *meta, True,
             opts["dt_min"], opts["dt_max"], opts["chunk_size"])
    out = rms_norm_reference(y.to(opts["norm_in_dtype"]).reshape(1, T, -1), a["norm_weight"], a["gate"], opts["eps"],
                             (h // g) * p, 0.0, opts["cast_first"], opts["out_dtype"])
    return out, a


def check(args, meta, opts, out_tol=1e-5, state_tol=1e-5):
    out, fused = run_fused(args, meta, opts)
    expected, ref = run_unfused(args, meta, opts)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected.float(), rtol=out_tol, atol=out_tol)
    for name in CACHES:
        if ref[name] is not None:
            torch.testing.assert_close(fused[name], ref[name], rtol=state_tol, atol=state_tol,
                                           msg=lambda m, name=name: f"{name}: {m}")
    assert torch.isfinite(out).all() and out.abs().max() > 0
    return out, fused


@pytest.fixture(params=["one block per head", "blocks of 4 rows"])
def block_p(request, monkeypatch):
    """The interpreter's choice (a program per head) and blocks smaller than a head, as on the GPU (4-row blocks:
    several programs per head share its norm group's counter)."""
    if request.param != "one block per head":
        monkeypatch.setattr(triton_mamba_mixer, "_block_p", lambda items, h, p, device: 4)


@pytest.mark.parametrize("lanes", [DECODE, SHORT], ids=["decode", "short"])
def test_fused_lanes_float32(lanes, block_p):
    args, meta = make_step(lanes, **SIZES, seed=1)
    check(args, meta, options(**{k: SIZES[k] for k in "hpgn"}))


def test_mixed_step_with_replay_buffers_delegates_exactly(block_p):
    args, meta = make_step(MIXED, **SIZES, replay=True, seed=2)
    check(args, meta, options(**{k: SIZES[k] for k in "hpgn"}))


def test_long_step_without_speculation():
    # 33 + 1 + 2 tokens: the long lane goes through the existing kernels, the others fused
    lanes = [(33, 0, 1, 0, False), (1, 7, 3, 0, False), (2, 3, 8, 0, False), (0, 0, 0, 0, False)]
    args, meta = make_step(lanes, **SIZES, seed=3)
    check(args, meta, options(**{k: SIZES[k] for k in "hpgn"}))


def test_more_lanes_than_the_chunked_limit_keep_a_long_lane_fused(monkeypatch):
    """With 40 lanes (M = 40) a 33-token lane in a 35-token step is the fused kernel's alone: one launch."""
    lanes = [(33, 0, 1, 0, False), (1, 7, 3, 0, False), (1, 0, 2, 0, False)] + [(0, 0, 0, 0, False)] * 37
    assert triton_mamba_mixer.max_fused_tokens(len(lanes)) == 40
    monkeypatch.setattr(triton_mamba_mixer, "launch_cached_causal_conv1d", lambda *a, **k: pytest.fail("conv ran"))
    args, meta = make_step(lanes, **SIZES, seed=10)
    out, fused = run_fused(args, meta, options(**{k: SIZES[k] for k in "hpgn"}))
    monkeypatch.undo()
    check(args, meta, options(**{k: SIZES[k] for k in "hpgn"}))


def test_odd_sizes_one_group_dt_limits_no_bias(block_p):
    # head_dim 12 (a partial block of 8), d_state 12, one group (the norm spans every head), conv width 3
    sizes = dict(h=3, p=12, g=1, n=12, k=3)
    args, meta = make_step(SHORT, **sizes, seed=4, bias=False, with_D=False)
    check(args, meta, options(3, 12, 1, 12, dt_min=0.05, dt_max=0.6))


def test_bfloat16(block_p):
    # bf16 model: y rounded to bf16 before the norm, output in bf16 (NemotronH: float32 weight product
    # first, cast_first False); the float32 states agree to float32 rounding; outputs to a bf16 ulp
    args, meta = make_step(SHORT, **SIZES, dtype=torch.bfloat16, seed=5)
    for cast_first in (False, True):
        check(args, meta, options(**{k: SIZES[k] for k in "hpgn"}, norm_in=torch.bfloat16, cast_first=cast_first,
                                  out=torch.bfloat16), out_tol=2**-7, state_tol=1e-5)


def float64_decode(args, lane_rows, h, p, g, n, k):
    """y of plain decode lanes in float64 from the formulas (conv, SiLU, softplus dt, state update,
    y = C S + D x, gated group RMSNorm), ``lane_rows``: (slot, token row) per lane."""
    d = {k_: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for k_, v in args.items()}
    outs = []
    for slot, t in lane_rows:
        window = torch.cat([d["conv_state"][slot], d["xBC"][0, :, t:t + 1]], dim=-1)  # [c, k]
        xbc = F.silu((window * d["conv_weight"]).sum(-1) + d["conv_bias"])
        x, B, C = xbc.split([h * p, g * n, g * n])
        x, B, C = x.view(h, p), B.view(g, n).repeat_interleave(h // g, 0), C.view(g, n).repeat_interleave(h // g, 0)
        dt = F.softplus(d["dt"][0, t] + d["dt_bias"])
        S = d["ssm_state"][slot] * torch.exp(dt * d["A"])[:, None, None] + (dt[:, None] * x)[..., None] * B[:, None]
        y = (S * C[:, None]).sum(-1) + d["D"][:, None] * x
        gated = (y.reshape(-1) * F.silu(d["gate"][0, t])).view(g, -1)
        normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + 1e-5)
        outs.append(normed.reshape(-1) * d["norm_weight"])
    return torch.stack(outs)


def test_decode_against_float64_formulas():
    args, meta = make_step(DECODE, **SIZES, seed=6)
    out, _ = run_fused(args, meta, options(**{k: SIZES[k] for k in "hpgn"}))
    # DECODE's lanes with state: slot 3 (row 0) and slot 5 (row 1)
    expected = float64_decode(args, [(3, 0), (5, 1)], **SIZES)
    torch.testing.assert_close(out[0, :2].double().cpu(), expected, rtol=2e-5, atol=2e-5)


def test_one_launch_for_a_decode_step_without_speculation(monkeypatch):
    launched = []
    for kernel in ("_mamba_mixer_kernel", "_fused_lane_mask_kernel"):
        fn = getattr(triton_mamba_mixer, kernel)
        monkeypatch.setattr(fn, "run", (lambda run, name: lambda *a, **kw: (launched.append(name), run(*a, **kw))[1])(
            fn.run, kernel))
    args, meta = make_step(DECODE, **SIZES, seed=7)
    monkeypatch.setattr(triton_mamba_mixer, "launch_cached_causal_conv1d", lambda *a, **k: pytest.fail("conv ran"))
    run_fused(args, meta, options(**{k: SIZES[k] for k in "hpgn"}))
    assert launched == ["_mamba_mixer_kernel"]


def test_opcheck():
    args, meta = make_step(SHORT, **SIZES, seed=8)
    counters = COUNTERS(torch.zeros(1, args["xBC"].shape[-1], dtype=torch.long, device=DEVICE), 1, 2)
    opts = options(**{k: SIZES[k] for k in "hpgn"})
    torch.library.opcheck(FUSED, (*args.values(), *meta, counters, 0, *opts.values()),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(COUNTERS, (torch.zeros(1, 5, dtype=torch.long), 2, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 64])
def test_bench_hybrid_sizes_on_the_gpu_eager_and_captured(batch):
    """bench-hybrid-0.6b's mixer (64 heads x 64, d_state 128, 8 groups, bf16, NemotronH's norm) at
    batch 1 and 64 plus the padding lane: the torch chain's outputs and states; a CUDA-graph replay
    gives the eager call's results bit for bit."""
    h, p, g, n, k = 64, 64, 8, 128, 4
    lanes = [(1, 100 + i, i + 1, 0, False) for i in range(batch)] + [(0, 0, 0, 0, False)]
    args, meta = make_step(lanes, h=h, p=p, g=g, n=n, k=k, dtype=torch.bfloat16, seed=9, num_slots=batch + 2)
    opts = options(h, p, g, n, norm_in=torch.bfloat16, cast_first=False, out=torch.bfloat16)
    # state_tol: the conv output is rounded to bf16 before the scan, and the fused and the separate conv
    # kernels accumulate in different orders, so an element of x or B can land one bf16 ulp apart, which
    # moves the state elements it feeds by up to ~1e-2 (measured at batch 64 on an H200: 327 of 34.6 M
    # state elements, at most 0.0085); a wrong lane, slot or head moves whole rows by O(1)
    eager, eager_caches = check(args, meta, opts, out_tol=2**-7, state_tol=2**-6)
    static = {k_: (v.clone() if k_ in CACHES and v is not None else v) for k_, v in args.items()}
    ids = torch.zeros(1, args["xBC"].shape[-1], dtype=torch.long, device=DEVICE)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # capture runs nothing: the caches keep their initial values
        out = FUSED(*static.values(), *meta, COUNTERS(ids, 1, g), 0, *opts.values())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    for name in ("conv_state", "ssm_state"):
        assert torch.equal(static[name], eager_caches[name]), name
