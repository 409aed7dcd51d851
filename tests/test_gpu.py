"""GPU checks (``pytest -m gpu``): every fast backend against the torch backend on the same GPU.

Model level, float32: greedy tokens of the Triton backends equal the torch backend's for every
zoo model, with and without speculative decoding (replay included). bfloat16: the Triton
backends' prefill logits stay within 5e-2 x max|logit| of the torch backend in float32. The op
level checks live in tests/custom_ops/test_triton_*.py, which run on CUDA when it is there.
"""

import pytest
import torch

from autodeploy import LLM, SamplingParams, backends
from autodeploy.models import build_model, zoo_names
from autodeploy.runtime.batch import LaneInput

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# explicit cache sizes: several engines are alive at once in a test (the default takes 90 % of the GPU)
CACHE_BYTES = 2**28
OPTIONS = dict(max_batch_size=4, max_seq_len=256, max_num_tokens=64, page_size=16, device="cuda",
               max_cache_bytes=CACHE_BYTES)


def prompts(vocab, lens=(1, 17, 45, 120), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, vocab, (n,), generator=g).tolist()} for n in lens]


def tokens(llm, ps, params):
    return [o.outputs[0].token_ids for o in llm.generate(ps, params)]


@pytest.mark.parametrize("name", zoo_names())
def test_triton_backends_give_torch_backend_tokens(name):
    model = build_model(name)
    ps, params = prompts(model.config.vocab_size), SamplingParams(max_tokens=24, ignore_eos=True)
    ref = tokens(LLM(model, attn_backend="torch", ssm_backend="torch", **OPTIONS), ps, params)
    fast = LLM(model, attn_backend="triton", ssm_backend="triton", **OPTIONS)
    assert tokens(fast, ps, params) == ref
    spec = LLM(model, attn_backend="triton", ssm_backend="triton", **OPTIONS,
               speculative_config={"method": "draft_model", "model": build_model(name), "num_speculative_tokens": 3})
    assert tokens(spec, ps, params) == ref
    assert spec.spec_stats.num_accepted_tokens > 0


@pytest.mark.parametrize("name", ["hybrid", "nemotron_h", "gemma2"])
def test_bfloat16_prefill_logits_near_float32_torch(name):
    model = build_model(name)
    ids = prompts(model.config.vocab_size, lens=(50,))[0]["prompt_token_ids"]
    lane = LaneInput(ids, 0, 1, list(range(1, 5)))
    ref = LLM(model, attn_backend="torch", ssm_backend="torch", **OPTIONS).engine.runner.run([lane]).float()
    fast = LLM(build_model(name), attn_backend="triton", ssm_backend="triton", dtype="bfloat16", **OPTIONS)
    got = fast.engine.runner.run([lane]).float()
    assert (got - ref).abs().max() <= 5e-2 * ref.abs().max()


def test_long_prefill_through_the_chunk_parallel_scan_gives_torch_tokens(monkeypatch):
    """Prompts of 600 and 300 tokens: the SSD scan's chunk-parallel launches at their real sizes
    (256-token chunks, a fresh lane and a continuing one) give the torch backend's greedy tokens in
    float32 (CPU: the same check under the interpreter passes)."""
    from autodeploy.custom_ops import triton_ssd_chunks

    launched, real = [], triton_ssd_chunks.launch_parallel_chunks
    monkeypatch.setattr(triton_ssd_chunks, "PARALLEL_MIN_TOKENS", 256)  # off by default
    monkeypatch.setattr(triton_ssd_chunks, "launch_parallel_chunks",
                        lambda *a, **k: (launched.append(1), real(*a, **k)))
    model = build_model("hybrid")
    opts = dict(max_batch_size=2, max_seq_len=1024, max_num_tokens=640, page_size=16, device="cuda",
                max_cache_bytes=CACHE_BYTES)
    ps, params = prompts(model.config.vocab_size, lens=(600, 300)), SamplingParams(max_tokens=16, ignore_eos=True)
    ref = tokens(LLM(model, attn_backend="torch", ssm_backend="torch", **opts), ps, params)
    assert tokens(LLM(model, attn_backend="triton", ssm_backend="triton", **opts), ps, params) == ref
    assert launched, "no step went through the chunk-parallel launches"


@pytest.mark.parametrize("name", zoo_names())
def test_cuda_graphs_give_eager_tokens(name):
    """Captured decode/verify graphs (padded to the next captured size) and inductor + CUDA graphs
    give the eager engine's tokens, with and without draft-model speculation (replay in the graph)."""
    model = build_model(name)
    ps, params = prompts(model.config.vocab_size), SamplingParams(max_tokens=24, ignore_eos=True)
    fast = dict(attn_backend="triton", ssm_backend="triton", **OPTIONS)
    ref = tokens(LLM(model, compile_mode="eager", **fast), ps, params)
    graphed = LLM(model, compile_mode="cudagraph", **fast)
    assert tokens(graphed, ps, params) == ref
    assert graphed.engine.runner.num_replays > 0
    spec = {"method": "draft_model", "model": build_model(name), "num_speculative_tokens": 3}
    graphed_spec = LLM(model, compile_mode="cudagraph", speculative_config=spec, **fast)
    assert tokens(graphed_spec, ps, params) == ref
    assert graphed_spec.spec_stats.num_accepted_tokens > 0 and graphed_spec.engine.runner.num_replays > 0
    assert tokens(LLM(model, compile_mode="inductor+cudagraph", **fast), ps, params) == ref


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs a Hopper or newer GPU")
@pytest.mark.parametrize("name", ["hybrid", "gemma3"])
def test_programmatic_dependent_launch_gives_the_same_tokens(name, monkeypatch):
    """Every Triton kernel launched with programmatic dependent launch (each waits for the kernel
    before it first): the same tokens as plain launches, eager and from CUDA graphs, with draft-model
    speculation too."""
    from autodeploy.custom_ops import triton_pdl

    model = build_model(name)
    ps, params = prompts(model.config.vocab_size), SamplingParams(max_tokens=24, ignore_eos=True)
    spec = {"method": "draft_model", "model": build_model(name), "num_speculative_tokens": 3}
    fast = dict(attn_backend="triton", ssm_backend="triton", **OPTIONS)
    ref = tokens(LLM(model, compile_mode="eager", **fast), ps, params)
    monkeypatch.setattr(triton_pdl, "PDL_ENABLED", True)
    assert tokens(LLM(model, compile_mode="eager", **fast), ps, params) == ref
    assert tokens(LLM(model, compile_mode="cudagraph", speculative_config=spec, **fast), ps, params) == ref


def test_cuda_graph_replays_are_immune_to_poison():
    """Before every replay the captured graphs' private memory pool (all their intermediates:
    every derived metadata buffer) and every unowned cache region are filled with garbage; the
    tokens do not change, with verify steps and replay included."""
    model = build_model("hybrid")
    ps, params = prompts(model.config.vocab_size), SamplingParams(max_tokens=24, ignore_eos=True)
    spec = {"method": "draft_model", "model": build_model("hybrid"), "num_speculative_tokens": 3}
    fast = dict(attn_backend="triton", ssm_backend="triton", compile_mode="cudagraph", speculative_config=spec,
                **OPTIONS)
    ref = tokens(LLM(model, **fast), ps, params)
    llm = LLM(model, **fast)
    llm.engine.runner.poison = llm.drafter.runner.poison = True
    assert tokens(llm, ps, params) == ref
    assert llm.engine.runner.num_replays > 0 and llm.engine.runner._pool_poisoner.bytes > 0


@pytest.mark.parametrize("name", zoo_names())
def test_dynamo_backend_on_the_gpu(name):
    """torch.compile(model, backend="autodeploy") on CUDA (SDPA attention, Triton Mamba2 kernels
    through prepare(), inductor): logits within 1e-3 of the eager model (float32; TF32 off)."""
    from autodeploy.dynamo_backend import prepare

    torch._dynamo.reset()
    model = build_model(name).cuda()
    ids = torch.randint(0, model.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(0)).cuda()
    pos = torch.arange(70, device="cuda")[None]
    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        compiled = torch.compile(prepare(model), backend="autodeploy")
        got = compiled(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)


# -- flashinfer attention (needs flashinfer; head_dim 128 models so each JIT variant builds once) --


def _need_flashinfer():
    pytest.importorskip("flashinfer")


@pytest.mark.parametrize("window", [0, 32])
def test_flashinfer_attention_op_matches_torch(window):
    """Mixed lanes (prefill, chunk, decode, verify, empty, padding) against the torch backend on the
    same bf16 inputs: relative error within 2e-2 (bf16 noise, float32 accumulation in both)."""
    _need_flashinfer()
    from autodeploy.custom_ops import flashinfer_attention as fa
    from autodeploy.custom_ops.prepare_metadata import prepare_attention_metadata, swa_ring_pages

    page, hq, hkv, d = 16, 16, 4, 128
    lanes = [(70, 0, 1), (20, 45, 2), (1, 90, 3), (4, 60, 4), (0, 30, 5), (5, 0, 0)]
    ring = swa_ring_pages(window, 128, page) if window else 0
    num_pages = 6 * (ring or 10) + 1
    table = torch.zeros(len(lanes), 10, dtype=torch.int32)
    perm = torch.randperm(num_pages - 1, generator=torch.Generator().manual_seed(0)) + 1
    for i, (_, _, slot) in enumerate(lanes):
        if slot:
            table[i] = perm[(slot - 1) * 10:slot * 10] if not window else 0
    host = {"seq_lens": torch.tensor([n for n, _, _ in lanes], dtype=torch.int32),
            "cached_lens": torch.tensor([c for _, c, _ in lanes], dtype=torch.int32),
            "slots": torch.tensor([s for _, _, s in lanes], dtype=torch.int32), "page_table": table}
    T = int(host["seq_lens"].sum())
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, T, h, d, generator=g, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    k_cache = torch.randn(num_pages, page, hkv, d, generator=g, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    meta = prepare_attention_metadata(torch.zeros(1, T, dtype=torch.long, device="cuda"),
                                      *(host[n].cuda() for n in ("seq_lens", "cached_lens", "slots", "page_table")),
                                      page, window, ring)
    spec = fa.AttentionPlanSpec(page, window, ring, window, d ** -0.5, 0.0, hq, hkv, d, torch.bfloat16)
    plan_id = -1 - window  # an id of this test's own, live while `plan` is held
    plan = backends.register_host_half(plan_id, fa.AttentionPlan(spec, len(lanes), 10, "cuda"))
    plan.plan(host, captured=False)
    kc, vc = k_cache.clone(), v_cache.clone()
    got = torch.ops.autodeploy.flashinfer_cached_attention(q, k, v, kc, vc, *meta, d ** -0.5, window, 0.0, None,
                                                           plan_id)
    ref = torch.ops.autodeploy.torch_cached_attention(q, k, v, k_cache, v_cache, *meta, d ** -0.5, window, 0.0, None)
    assert torch.equal(kc, k_cache) and torch.equal(vc, v_cache)  # the same writes
    err = (got.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert err < 2e-2, err


@pytest.mark.parametrize("name", ["bench-swa-0.7b", "bench-hybrid-0.6b"])
def test_flashinfer_model_logits_near_float32_torch(name):
    """A 1500-token prompt in 512-token chunks (the 1024-key window slides over the rings): the
    flashinfer backend (bf16) gives the float32 torch backend's last-token logits within 5e-2 x max."""
    _need_flashinfer()
    model = build_model(name).cuda()
    ids = prompts(model.config.vocab_size, lens=(1500,))[0]["prompt_token_ids"]
    opts = dict(max_batch_size=2, max_seq_len=1600, max_num_tokens=512, page_size=16, device="cuda",
                max_cache_bytes=CACHE_BYTES)
    chunks = [ids[i:i + 512] for i in range(0, 1500, 512)]

    def last_logits(llm):
        pages = list(range(1, 101))
        for i, chunk in enumerate(chunks):
            out = llm.engine.runner.run([LaneInput(chunk, 512 * i, 1, pages)])
        return out[-1].float()

    ref = last_logits(LLM(model, attn_backend="torch", ssm_backend="torch", **opts))
    fast = LLM(build_model(name), attn_backend="flashinfer", ssm_backend="triton", dtype="bfloat16", **opts)
    got = last_logits(fast)
    assert (got - ref).abs().max() <= 5e-2 * ref.abs().max()


def test_flashinfer_cuda_graphs_plan_every_replay():
    """Captured decode and verify steps with flashinfer (planned on the host before each replay)
    give the logits of the eager Triton backend on the same steps, within bf16 noise."""
    _need_flashinfer()
    model = build_model("bench-swa-0.7b", dtype=torch.bfloat16, device="cuda")
    opts = dict(max_batch_size=4, max_seq_len=1600, max_num_tokens=256, page_size=16, device="cuda",
                max_cache_bytes=CACHE_BYTES, dtype="bfloat16",
                speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    graphed = LLM(model, attn_backend="flashinfer", compile_mode="cudagraph", **opts)
    eager = LLM(model, attn_backend="triton", compile_mode="eager", **opts)
    g = torch.Generator().manual_seed(3)
    prompts_ = [torch.randint(0, 32000, (n,), generator=g).tolist() for n in (1100, 200, 37)]
    pages = [list(range(1 + 80 * i, 81 + 80 * i)) for i in range(3)]
    steps = []
    for i, p in enumerate(prompts_):  # prefill in 256-token chunks
        steps += [[LaneInput(p[s:s + 256], s, i + 1, pages[i])] for s in range(0, len(p), 256)]
    lens = [len(p) for p in prompts_]
    for t in range(6):  # decode steps, every other one a verify step (1 + 3 tokens) for lane 0
        verify = t % 2 == 1
        steps.append([LaneInput([5, 6, 7, 8] if verify and i == 0 else [9], lens[i] + t * 4, i + 1, pages[i],
                                verify=verify and i == 0) for i in range(3)])
    for lanes in steps:
        got, ref = graphed.engine.runner.run(lanes).float(), eager.engine.runner.run(lanes).float()
        assert (got - ref).abs().max() <= 5e-2 * ref.abs().max()
    assert graphed.engine.runner.num_replays >= 6


# -- flashinfer SSM backend (decode lanes through selective_state_update) --
def test_flashinfer_ssd_scan_matches_torch():
    """Mixed lanes, bf16 inputs, float32 state: outputs and every slot's state against the torch
    backend (rel. 2e-2), with flashinfer's decode kernel serving the plain decode lanes."""
    _need_flashinfer()
    import sys

    sys.path.insert(0, "tests/custom_ops")
    from test_triton_ssd_scan import MIXED, TORCH, assert_close_scaled, make_step

    from autodeploy.custom_ops import flashinfer_ssd_scan as fs

    real_kernel, calls = fs._decode_kernel(), []

    def kernel(*a, **k):  # counts its launches: a fallback to the Triton scan would fail the test
        calls.append(1)
        return real_kernel(*a, **k)

    decodes = [(1, 7 + i, 1 + i, 0, False) for i in range(8)]
    for lanes in (MIXED, decodes):
        num_slots = max(len(lanes), max(lane[2] for lane in lanes) + 1)  # a state row per lane (flashinfer's check)
        args, meta = make_step(lanes, h=8, p=64, n=128, g=2, dtype=torch.bfloat16, seed=4, num_slots=num_slots)
        mutable = ("ssm_state", "replay_x", "replay_dt", "replay_B")
        ref = {k: (v.clone() if k in mutable and v is not None else v) for k, v in args.items()}
        opts = (True, 0.0, float("inf"), 32)
        expected = TORCH(*ref.values(), *meta, *opts)
        calls.clear()
        got = fs.scan_with_decode_kernel(kernel, *args.values(), *meta, *opts)
        assert calls, "flashinfer's decode kernel did not run"
        assert_close_scaled(got, expected, 2e-2)
        assert_close_scaled(args["ssm_state"], ref["ssm_state"], 2e-2)


def test_flashinfer_ssm_backend_decode_logits_near_triton():
    """bench-hybrid-0.6b with ssm_backend="flashinfer" under CUDA graphs: prefill then decode steps
    (captured, plain decode lanes through flashinfer) give the Triton backend's logits within bf16 noise."""
    _need_flashinfer()
    model = build_model("bench-hybrid-0.6b", dtype=torch.bfloat16, device="cuda")
    opts = dict(max_batch_size=4, max_seq_len=512, max_num_tokens=256, page_size=16, device="cuda",
                max_cache_bytes=CACHE_BYTES, dtype="bfloat16", attn_backend="triton", compile_mode="cudagraph")
    fast, ref = LLM(model, ssm_backend="flashinfer", **opts), LLM(model, ssm_backend="triton", **opts)
    g = torch.Generator().manual_seed(5)
    prompts_ = [torch.randint(0, 32000, (n,), generator=g).tolist() for n in (300, 40, 7)]
    pages = [list(range(1 + 32 * i, 33 + 32 * i)) for i in range(3)]
    steps = [[LaneInput(p[s:s + 256], s, i + 1, pages[i])]
             for i, p in enumerate(prompts_) for s in range(0, len(p), 256)]
    steps += [[LaneInput([11 + t], len(p) + t, i + 1, pages[i]) for i, p in enumerate(prompts_)] for t in range(5)]
    for lanes in steps:
        got, want = fast.engine.runner.run(lanes).float(), ref.engine.runner.run(lanes).float()
        assert (got - want).abs().max() <= 5e-2 * want.abs().max()
    assert fast.engine.runner.num_replays >= 5
