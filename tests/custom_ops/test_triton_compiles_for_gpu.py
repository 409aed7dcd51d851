"""Every Triton kernel compiles for the H100 (sm_90a) on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1, how CI runs the kernels) checks their logic, not what only
the GPU compiler rejects: a loop-carried variable changing type passed every interpreter test
and failed the first GPU run. Here the launches of real steps are recorded instead of run (a
bf16 bench-hybrid-0.6b step of each kind through the Triton backends, the fused small ops at its
sizes), with their argument types, and each distinct signature is compiled to PTX and cubin for
sm_90a (triton's bundled ptxas) in a subprocess where ``triton.jit`` compiles instead of
interpreting. The recorded kernels' numbers are garbage (nothing ran); only types matter here.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("records launches through the Triton interpreter (the CPU test setup)", allow_module_level=True)

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from autodeploy import LLM  # noqa: E402
from autodeploy.models import build_model  # noqa: E402
from autodeploy.runtime.batch import LaneInput  # noqa: E402

_COMPILE = textwrap.dedent("""
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int32": "i32", "int64": "i64",
             "uint8": "u8", "int8": "i8", "bool": "i1"}
    failures = []
    for launch in json.load(sys.stdin):
        fn = getattr(importlib.import_module(launch["module"]), launch["name"])
        signature, constexprs = {}, {}
        for p in fn.params:
            kind, value = launch["args"].get(p.name, ("default", None))
            if kind == "default":
                value = p.default
            if p.is_constexpr or value is None:
                signature[p.name], constexprs[p.name] = "constexpr", value
            elif kind == "tensor":
                signature[p.name] = "*" + TYPES[value]
            elif isinstance(value, bool):
                signature[p.name] = "i1"
            elif isinstance(value, int):
                signature[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            else:
                signature[p.name] = "fp32"
        try:
            kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                    options=launch["options"])
            assert kernel.asm.get("cubin"), "no cubin"
        except Exception as e:
            failures.append(f"{launch['name']} {signature} {constexprs}: {type(e).__name__}: {e}")
    print(json.dumps({"triton_file": triton.__file__, "failures": failures}))
""")


@pytest.fixture
def recorded(monkeypatch):
    """Launches made under the interpreter, recorded (module, kernel, argument types), not run."""
    launches = {}

    def record(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(self.arg_names, args), **kwargs)
        described = {name: ("tensor", str(v.dtype).removeprefix("torch.")) if isinstance(v, torch.Tensor)
                     else ("scalar", v) for name, v in bound.items()}
        launch = {"module": self.fn.__module__, "name": self.fn.__name__, "args": described, "options": options}
        launches[json.dumps(launch, sort_keys=True, default=str)] = launch

    monkeypatch.setattr(InterpretedFunction, "run", record)
    return launches


# The GPU machines' Triton is older than ours (their torch 2.11 pins triton 3.6.0) and
# its compiler rejects code 3.9 accepts (a lane search in a static_range unrolled over an int64 load
# failed its layout pass): the README's test command installs that version into .gpu-triton/ so
# that every kernel is compiled by both.
GPU_TRITON = os.environ.get("AUTODEPLOY_GPU_TRITON", os.path.join(os.path.dirname(__file__), "..", "..", ".gpu-triton"))


def _compile_for_sm90(launches: dict, triton_path: str | None = None) -> list[str]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    if triton_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(triton_path), *sys.path])
    proc = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(list(launches.values())),
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if triton_path is not None:  # the compiler asked for, not the installed one
        assert os.path.realpath(result["triton_file"]).startswith(os.path.realpath(triton_path)), result["triton_file"]
    return result["failures"]


def _model_steps(launches: dict) -> None:
    """Prefill (chunked, two lanes), decode, verify and replay steps of bench-hybrid-0.6b in bf16
    through the Triton attention (decode steps split over the keys: lanes hold up to 1024), SSD-scan
    and conv kernels."""
    torch.manual_seed(0)
    model = build_model("bench-hybrid-0.6b", dtype=torch.bfloat16)
    llm = LLM(model, dtype="bfloat16", device="cpu", max_batch_size=2, max_seq_len=1024, max_num_tokens=64,
              attn_backend="triton", ssm_backend="triton", compile_mode="eager",
              speculative_config={"method": "ngram", "num_speculative_tokens": 2},
              self_check=False)  # launches are recorded, not run: its logits would be garbage
    run = llm.engine.runner.run
    run([LaneInput(list(range(40)), 0, 1, [1, 2, 3]), LaneInput(list(range(5)), 0, 2, [4, 5, 6])])  # prefill
    run([LaneInput([7] * 20, 40, 1, [1, 2, 3]), LaneInput([3], 5, 2, [4, 5, 6])])  # chunk + decode
    run([LaneInput([3, 4, 5], 60, 1, [1, 2, 3], verify=True), LaneInput([3], 6, 2, [4, 5, 6])])  # verify
    run([LaneInput([4, 6, 1], 62, 1, [1, 2, 3], accepted=2, verify=True)])  # replay + verify


def _small_ops(monkeypatch) -> None:
    """The fused small ops at bench-hybrid / bench-swa sizes, bf16 (float32 where models keep it)."""
    from autodeploy.custom_ops.triton_gated_activation import triton_gated_activation
    from autodeploy.custom_ops.triton_logit_rows import triton_logit_rows
    from autodeploy.custom_ops.triton_rms_norm import triton_fused_add_rms_norm, triton_rms_norm
    from autodeploy.custom_ops.triton_rope import triton_rope

    bf16, f32 = torch.bfloat16, torch.float32
    x, w = torch.randn(1, 3, 2048, dtype=bf16), torch.randn(2048, dtype=bf16)
    for dtype in (bf16, f32):
        triton_rms_norm(x.to(dtype), w, None, 1e-6, 0, 0.0, True, bf16)
        triton_rms_norm(x.to(dtype), w, x, 1e-6, 256, 0.0, False, bf16)  # gated, grouped (Mamba2)
        triton_rms_norm(x, w, x.to(dtype), 1e-6, 256, 0.0, False, f32)  # NemotronH: bf16 in, float32 out
        triton_fused_add_rms_norm(x, x.to(dtype), w, 1e-6, 1.0, False, dtype)
    gate_up = torch.randn(3, 2 * 4096, dtype=bf16)
    for act in ("silu", "gelu", "gelu_tanh"):
        triton_gated_activation(gate_up[:, :4096], gate_up[:, 4096:], act)
    triton_gated_activation(gate_up[:, :4096], None, "relu2")
    positions, table = torch.arange(3)[None], torch.randn(64, 128, dtype=f32)
    for token_dim in (1, 2):
        shape = (1, 3, 8, 256) if token_dim == 1 else (1, 8, 3, 256)
        kshape = (1, 3, 2, 256) if token_dim == 1 else (1, 2, 3, 256)
        triton_rope(torch.randn(shape, dtype=bf16), torch.randn(kshape, dtype=bf16), positions, table, table, token_dim)
    triton_logit_rows(torch.tensor([3, 1, 0], dtype=torch.int32), torch.tensor([True, False, False]), 5)
    # the SSD scan's chunk-parallel launches (off by default): a step with a lane of >= 256 tokens
    from autodeploy.custom_ops import triton_ssd_chunks
    from autodeploy.custom_ops.prepare_metadata import prepare_ssm_metadata
    from autodeploy.custom_ops.triton_ssd_scan import launch_cached_ssd_scan

    monkeypatch.setattr(triton_ssd_chunks, "PARALLEL_MIN_TOKENS", 256)

    lens = torch.tensor([400, 112], dtype=torch.int32)
    scan_meta = prepare_ssm_metadata(torch.zeros(1, 512, dtype=torch.long), lens,
                                     torch.tensor([16, 0], dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
                                     torch.zeros(2, dtype=torch.bool))
    x = torch.randn(1, 512, 64, 64, dtype=bf16)
    BC = torch.randn(1, 512, 8, 128, dtype=bf16)
    launch_cached_ssd_scan(x, torch.randn(1, 512, 64, dtype=bf16), -torch.rand(64), BC, BC, torch.randn(64),
                           torch.randn(64), torch.zeros(3, 64, 64, 128), None, None, None,
                           torch.tensor([1, 2], dtype=torch.int32), *scan_meta, True, 0.0, float("inf"), 128)
    # the conv's in-kernel lane search at more lane counts (its search depth grows with them), with
    # the int64 lane ends the float32 zoo models pass
    from autodeploy.custom_ops.triton_causal_conv1d import triton_cached_causal_conv1d

    for lanes, dtype, ends in ((5, f32, torch.int64), (64, bf16, torch.int64), (9, bf16, torch.int32)):
        xc = torch.randn(1, 96, lanes, dtype=dtype)
        triton_cached_causal_conv1d(xc, torch.randn(96, 4, dtype=dtype), torch.randn(96, dtype=dtype), "silu",
                                    torch.zeros(lanes + 1, 96, 3, dtype=dtype), None,
                                    torch.arange(1, lanes + 1, dtype=torch.int32), torch.arange(lanes + 1, dtype=ends),
                                    torch.ones(lanes, dtype=torch.bool), torch.zeros(lanes, dtype=torch.int32),
                                    torch.zeros(lanes, dtype=torch.bool))
    # the prepare kernels (full-attention and ring pools, a strided page table as the runner's)
    from autodeploy.custom_ops.triton_prepare_metadata import (
        triton_prepare_attention_metadata,
        triton_prepare_ssm_metadata,
    )

    facts = [torch.tensor(v, dtype=torch.int32) for v in ([5, 1, 0], [0, 40, 0], [1, 2, 0])]
    table = torch.zeros(33, 3, dtype=torch.int32).T
    for window, ring, chunk in ((0, 0, 0), (1024, 66, 0), (8192, 517, 8192)):
        triton_prepare_attention_metadata(6, *facts, table, 16, window, ring, chunk)
    triton_prepare_ssm_metadata(facts[0], facts[1], torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.bool))
    # autodeploy::linear's one-row kernel at bench-hybrid shapes (and a ragged K)
    from autodeploy.custom_ops.triton_gemv import triton_gemv

    for n, k in ((10304, 2048), (2048, 4096), (32000, 2048), (3000, 100)):
        triton_gemv(torch.randn(1, k, dtype=bf16), torch.randn(n, k, dtype=bf16), torch.randn(n, dtype=bf16))
    # and with the RMSNorm before it (plain and with the residual add; both cast orders)
    from autodeploy.custom_ops.triton_norm_gemv import triton_norm_gemv

    row, w = torch.randn(1, 2048, dtype=bf16), torch.randn(10304, 2048, dtype=bf16)
    for residual, cast_first in ((None, True), (row, False)):
        triton_norm_gemv(row, residual, torch.randn(2048, dtype=bf16), 1e-6, 1.0, cast_first, w, None)
    # Gemma 3's q/k head norms + RoPE in one launch, both layouts, a full and a partial rotary table
    from autodeploy.custom_ops.triton_norm_rope import triton_norm_rope

    for token_dim, rotary in ((1, 256), (2, 128)):
        shape = (1, 3, 4, 256) if token_dim == 1 else (1, 4, 3, 256)
        kshape = (1, 3, 1, 256) if token_dim == 1 else (1, 1, 3, 256)
        triton_norm_rope(torch.randn(shape, dtype=bf16), torch.randn(kshape, dtype=bf16), torch.randn(256, dtype=bf16),
                         torch.randn(256, dtype=bf16), 1e-6, 1.0, False, torch.arange(3)[None],
                         torch.randn(64, rotary), torch.randn(64, rotary), token_dim)
    # Gemma's post-block norm + residual add + next norm in one launch (bf16 stream, float32 weights)
    from autodeploy.custom_ops.triton_norm_add_norm import triton_norm_add_norm

    rows = torch.randn(3, 2048, dtype=bf16)
    for cast_first in (True, False):
        triton_norm_add_norm(rows, torch.randn(2048), 1e-6, 1.0, cast_first, bf16, rows, torch.randn(2048), 1e-6, 1.0,
                             cast_first, bf16)
    # block-local (chunked) attention on its ring (Llama 4's local layers), bf16, with a decode lane
    from autodeploy.custom_ops.prepare_metadata import prepare_attention_metadata, swa_ring_pages
    from autodeploy.custom_ops.triton_attention import triton_cached_attention

    ring = swa_ring_pages(8192, 64, 16)
    seq, cached, slots = (torch.tensor(v, dtype=torch.int32) for v in ([40, 1], [8180, 9000], [1, 2]))
    attn_meta = prepare_attention_metadata(torch.zeros(1, 41, dtype=torch.long), seq, cached, slots,
                                           torch.zeros(2, 1, dtype=torch.int32), 16, 8192, ring, 8192)
    q, kv = torch.randn(1, 41, 40, 128, dtype=bf16), torch.randn(1, 41, 8, 128, dtype=bf16)
    cache = torch.zeros(3 * ring, 16, 8, 128, dtype=bf16)
    triton_cached_attention(q, kv, kv, cache, cache, *attn_meta, 128 ** -0.5, 0, 0.0, None, 8192)
    # the fused Mamba2 mixer at bench-hybrid sizes, bf16 (NemotronH's norm: float32 product, bf16 out), both
    # block sizes the GPU picks, and with replay buffers (its lane mask and the existing kernels' skips)
    from autodeploy.custom_ops import triton_mamba_mixer

    h, p, g, n = 64, 64, 8, 128
    c = h * p + 2 * g * n
    for lanes, block_p, replay in ((1, 8, False), (4, 16, True)):
        monkeypatch.setattr(triton_mamba_mixer, "_block_p", lambda items, h, p, device, b=block_p: b)
        lens = torch.ones(lanes + 1, dtype=torch.int32)
        lens[-1] = 0
        T = int(lens.sum())
        meta = prepare_ssm_metadata(torch.zeros(1, T, dtype=torch.long), lens, lens.clone(),
                                    torch.zeros(lanes + 1, dtype=torch.int32), torch.zeros(lanes + 1, dtype=torch.bool))
        in_proj = torch.randn(1, T, h * p + c + h, dtype=bf16)
        R = 3
        caches = (torch.zeros(lanes + 2, c, 3, dtype=bf16),
                  torch.zeros(lanes + 2, R, c, dtype=bf16) if replay else None,
                  torch.zeros(lanes + 2, h, p, n), *((torch.zeros(lanes + 2, R, h, p, dtype=bf16),
                                                      torch.zeros(lanes + 2, R, h, dtype=bf16),
                                                      torch.zeros(lanes + 2, R, g, n, dtype=bf16)) if replay
                                                    else (None, None, None)))
        triton_mamba_mixer.triton_cached_mamba_mixer(
            in_proj[..., h * p:h * p + c].transpose(1, 2), in_proj[..., h * p + c:], in_proj[..., :h * p],
            torch.randn(c, 4, dtype=bf16), torch.randn(c, dtype=bf16), "silu", -torch.rand(h), torch.randn(h),
            torch.randn(h), torch.randn(h * p, dtype=bf16), *caches, torch.arange(1, lanes + 2, dtype=torch.int32),
            *meta, torch.zeros(1, T, g, dtype=torch.int32), 0, h, p, g, n, True, 0.0, float("inf"), 128, bf16, 1e-5,
            0.0, False, bf16)
    # the flashinfer SSM backend's lane split (its decode kernel is flashinfer's, not compiled here)
    from autodeploy.custom_ops.flashinfer_ssd_scan import decode_lane_inputs

    i32 = torch.int32
    meta = prepare_ssm_metadata(torch.zeros(1, 3, dtype=torch.long), torch.tensor([1, 1, 1], dtype=i32),
                                torch.tensor([4, 0, 9], dtype=i32), torch.zeros(3, dtype=i32),
                                torch.zeros(3, dtype=torch.bool))
    B = torch.randn(1, 3, 8, 128, dtype=bf16)
    decode_lane_inputs(torch.randn(1, 3, 64, 64, dtype=bf16), torch.randn(1, 3, 64, dtype=bf16), B, B,
                       torch.tensor([1, 2, 3], dtype=i32), *meta)


@pytest.mark.parametrize("triton_version", ["installed", "gpu machine's"])
def test_every_triton_kernel_compiles_for_sm90(recorded, triton_version, monkeypatch):
    triton_path = None
    if triton_version != "installed":
        if not os.path.isdir(os.path.join(GPU_TRITON, "triton")):
            pytest.skip(f"no Triton at {GPU_TRITON}: pip install --no-deps --target .gpu-triton triton==3.6.0")
        triton_path = GPU_TRITON
    _model_steps(recorded)
    _small_ops(monkeypatch)
    launched = {launch["name"] for launch in recorded.values()}
    kernels = {fn.fn.__name__ for name, mod in list(sys.modules.items())
               if name.startswith("autodeploy.custom_ops.triton_")
               for fn in vars(mod).values()
               if isinstance(fn, InterpretedFunction) and fn.fn.__name__.endswith("_kernel")}
    assert len(kernels) >= 8 and kernels <= launched, f"kernels never launched here: {sorted(kernels - launched)}"
    for launch in [v for v in recorded.values() if "PDL" in v["args"]]:  # programmatic dependent launch too
        pdl = {**launch, "args": {**launch["args"], "PDL": ("scalar", True)},
               "options": {**launch["options"], "launch_pdl": True}}
        recorded[json.dumps(pdl, sort_keys=True, default=str)] = pdl
    failures = _compile_for_sm90(recorded, triton_path)
    assert not failures, "\n".join(failures)
