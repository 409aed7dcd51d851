"""The GPU benchmark suite in one process: a decode/prefill step profile, prefill, op-level
overhead, sliding-window memory and speculative decoding (decode throughput: bench_decode.py;
transforms: bench_transforms.py).

Models: bench-hybrid-0.6b and bench-swa-0.7b (autodeploy/models/zoo.py),
bf16, random seeded weights, one GPU. Everything a section prints goes to ``suite.json``.

    python benchmarks/bench_suite.py --out benchmarks/results [--sections profile prefill overhead memory spec]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from autodeploy import LLM, SamplingParams
from autodeploy.models import build_model
from autodeploy.runtime.speculative import Draft, Drafter

BF16 = dict(dtype="bfloat16", device="cuda")


def _sync_time(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


# -- prefill ---------------------------------------------------------------------------------------
def prefill(models: list[str], rows: list) -> list[dict]:
    """Time to first token and prefill tok/s for 2k and 8k prompts (one request, 2k-token chunks),
    with prefill chunks run eagerly (the default capture sizes stop at a full decode step) and
    replayed from a graph captured at the chunk size (``cuda_graph_sizes``), against transformers'
    forward on the same prompt."""
    g = torch.Generator().manual_seed(0)
    chunk = 2048
    for name in models:
        model = build_model(name, dtype=torch.bfloat16, device="cuda")
        for captured in (False, True):
            llm = LLM(model, max_batch_size=1, max_seq_len=8192 + 16, max_num_tokens=chunk, compile_mode="cudagraph",
                      cuda_graph_sizes=[1, chunk] if captured else [1], **BF16)
            for length in (2048, 8192):
                prompt = torch.randint(0, 32000, (length,), generator=g).tolist()
                params = SamplingParams(max_tokens=1, ignore_eos=True)
                # warm-up at the same length: after a shorter one, the first timed run paid one-time
                # costs of the new shape (compiles, allocator growth; measured on an H200)
                llm.generate([{"prompt_token_ids": prompt[::-1]}], params)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                llm.generate([{"prompt_token_ids": prompt}], params)
                torch.cuda.synchronize()
                ttft = time.perf_counter() - t0
                row = {"model": name, "prompt": length, "chunk": chunk, "captured": captured, "ttft_s": ttft,
                       "prefill_tok_s": length / ttft}
                if not captured and length == 2048:
                    ids = torch.tensor([prompt], device="cuda")
                    with torch.no_grad():
                        hf = _sync_time(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), 3)
                    row.update(hf_forward_s=hf, speedup_vs_hf=hf / ttft)
                print(json.dumps(row), flush=True)
                rows.append(row)
            del llm
            torch.cuda.empty_cache()
    return rows


# -- op-level overhead -----------------------------------------------------------------------------
def overhead(rows: list, batch: int = 64, context: int = 512) -> list[dict]:
    """A decode step of ``batch`` lanes through one attention layer and one Mamba layer: our path
    (prepare node + cached op, and the flashinfer plan on the host) against the raw kernel alone
    on the same inputs (flashinfer's paged kernel run; for the SSM, flashinfer's
    selective_state_update, the raw decode kernel, beside our Triton cached scan)."""
    import flashinfer

    import autodeploy.custom_ops.triton_ssd_scan  # noqa: F401  (registers the Triton cached scan)
    from autodeploy import backends
    from autodeploy.custom_ops import flashinfer_attention as fa
    from autodeploy.custom_ops.prepare_metadata import prepare_attention_metadata, prepare_ssm_metadata

    page, hq, hkv, d = 16, 16, 4, 128
    pages_per = -(-(context + 1) // page)
    lanes = batch + 1
    table = torch.zeros(lanes, pages_per, dtype=torch.int32)
    table[:batch] = torch.arange(1, 1 + batch * pages_per).view(batch, pages_per)
    host = {"seq_lens": torch.tensor([1] * batch + [0], dtype=torch.int32),
            "cached_lens": torch.tensor([context] * batch + [0], dtype=torch.int32),
            "slots": torch.tensor(list(range(1, batch + 1)) + [0], dtype=torch.int32), "page_table": table,
            "accepted_lens": torch.zeros(lanes, dtype=torch.int32), "verify": torch.zeros(lanes, dtype=torch.bool)}
    dev = {k: v.cuda() for k, v in host.items()}
    ids = torch.zeros(1, batch, dtype=torch.long, device="cuda")
    q = torch.randn(1, batch, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, batch, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kc = torch.randn(1 + batch * pages_per, page, hkv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    spec = fa.AttentionPlanSpec(page, 0, 0, 0, d ** -0.5, 0.0, hq, hkv, d, torch.bfloat16)
    plan = backends.register_host_half(-2, fa.AttentionPlan(spec, lanes, pages_per, "cuda"))  # held by `plan`

    def device_half():  # the prepare node, the KV write and the kernel: what the graph runs
        meta = prepare_attention_metadata(ids, dev["seq_lens"], dev["cached_lens"], dev["slots"], dev["page_table"],
                                          page, 0, 0)
        torch.ops.autodeploy.flashinfer_cached_attention(q, k, v, kc, vc, *meta, d ** -0.5, 0, 0.0, None, -2)

    def ours_attention():  # the host half first, as the runner does every step
        plan.plan(host, captured=False)
        device_half()

    plan.plan(host, captured=False)
    q2, out = q[0].contiguous(), torch.empty(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    raw = _sync_time(lambda: plan.eager.run(q2, (kc, vc), out=out), 200)
    ours = _sync_time(ours_attention, 200)
    parts = {"csr_lists_us": 1e6 * _sync_time(lambda: fa.csr_page_lists(spec, host), 200),
             "plan_us": 1e6 * _sync_time(lambda: plan.plan(host, captured=False), 200),
             "device_half_us": 1e6 * _sync_time(device_half, 200)}
    rows.append({"op": "attention (flashinfer), decode", "batch": batch, "context": context, "raw_us": raw * 1e6,
                 "ours_us": ours * 1e6, "overhead": ours / raw - 1, **parts,
                 "plan_profile": _host_profile(lambda: plan.plan(host, captured=False))})
    print(json.dumps(rows[-1]), flush=True)

    # SSM: bench-hybrid's mixer sizes
    nh, hd, ds, ng = 64, 64, 128, 8
    state = torch.randn(lanes, nh, hd, ds, device="cuda", dtype=torch.float32)
    x = torch.randn(1, batch, nh, hd, device="cuda", dtype=torch.bfloat16)
    dt = torch.randn(1, batch, nh, device="cuda", dtype=torch.bfloat16)
    A = -torch.rand(nh, device="cuda")
    B, C = (torch.randn(1, batch, ng, ds, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    D, dt_bias = torch.randn(nh, device="cuda"), torch.randn(nh, device="cuda")
    from autodeploy.custom_ops import flashinfer_ssd_scan  # noqa: F401  (the flashinfer SSM backend's op)

    st = state.clone()  # float32, like ours; rows read through indices as our op does (the same kernel variant)
    rows_idx = torch.arange(batch, device="cuda")
    xr, dtr = x[0], dt[0][..., None].expand(batch, nh, hd)
    Ar = A[:, None, None].expand(nh, hd, ds)
    Dr, dbr = D.to(torch.bfloat16)[:, None].expand(nh, hd), dt_bias.to(torch.bfloat16)[:, None].expand(nh, hd)
    try:  # the raw kernel's own conventions: per-head values expanded over head_dim ("tie_hdim")
        raw = _sync_time(lambda: flashinfer.mamba.selective_state_update(
            st, xr, dtr, Ar, B[0], C[0], Dr, dt_bias=dbr, dt_softplus=True, state_batch_indices=rows_idx,
            pad_slot_id=-1), 200)
    except Exception as e:  # a JIT or argument failure is reported, not fatal for the suite
        raw = float("nan")
        print(f"selective_state_update failed: {e!r}", flush=True)
    for label, op in (("Triton cached scan", torch.ops.autodeploy.triton_cached_ssd_scan.default),
                      ("flashinfer SSM backend op", torch.ops.autodeploy.flashinfer_cached_ssd_scan.default)):
        def ours_ssm(op=op):
            meta = prepare_ssm_metadata(ids, dev["seq_lens"], dev["cached_lens"], dev["accepted_lens"], dev["verify"])
            op(x, dt, A, B, C, D, dt_bias, state, None, None, None, dev["slots"], *meta, True, 0.0, float("inf"), 128)

        ours = _sync_time(ours_ssm, 200)
        rows.append({"op": f"ssm decode (ours: {label}; raw: flashinfer selective_state_update)",
                     "batch": batch, "raw_us": raw * 1e6, "ours_us": ours * 1e6, "overhead": ours / raw - 1})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _host_profile(fn, repeat: int = 50, top: int = 12) -> list[str]:
    """cProfile of ``fn`` on the host: the functions with the most own time (where a plan's time goes)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(repeat):
        fn()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return [line for line in text.getvalue().splitlines() if line.strip()][-top - 1:]


# -- profile: kernel time vs gaps vs host time -----------------------------------------------------
def _kernels(fn) -> tuple[float, int, list[dict]]:
    """(sum of kernel µs, kernel count, top kernels by total µs) of one call of ``fn`` (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:10]
    return total, sum(e.count for e in events), [
        {"kernel": e.key[:90], "us": e.self_device_time_total, "count": e.count} for e in top]


def profile(models: list[str], rows: list, batches=(1, 64), context: int = 512) -> list[dict]:
    """Where a decode step's time goes (CUDA graphs, Triton backends): the runner's whole step
    (host input fill + plans + replay + logits copy), the graph replay alone (back to back, GPU
    bound), and the sum of the kernels' own times in one eager run of the same graph. replay -
    kernels = the gaps between kernels inside the graph; step - replay = host time per step. Also a
    2k-token prefill step (eager: prefill steps are not captured): kernel sum vs wall time."""
    from bench_decode import copy_bandwidth  # this directory is on sys.path when run as a script

    from autodeploy.runtime.batch import LaneInput

    bandwidth = copy_bandwidth()
    for name in models:
        model = build_model(name, dtype=torch.bfloat16, device="cuda")
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        llm = LLM(model, max_batch_size=max(batches), max_seq_len=2048 + 16, max_num_tokens=2048,
                  compile_mode="cudagraph", attn_backend="triton", ssm_backend="triton", **BF16)
        runner = llm.engine.runner
        pages = -(-(context + 1) // 16)
        for bs in batches:
            lanes = [LaneInput([7], context, 1 + i, list(range(1 + i * pages, 1 + (i + 1) * pages))) for i in range(bs)]
            step = _sync_time(lambda: runner.run(lanes), 100)
            size = min(s for s in runner.graphs if s >= bs)
            replay = _sync_time(runner.graphs[size][0].replay, 100)
            args = runner._args(runner.inputs.fill(lanes))
            runner._plan(captured=False)
            with torch.no_grad():
                kernel_us, count, top = _kernels(lambda: runner.fn(*args))
            row = {"model": name, "kind": "decode", "batch": bs, "context": context, "step_us": step * 1e6,
                   "replay_us": replay * 1e6, "kernel_us": kernel_us, "kernels": count,
                   "gaps_us": replay * 1e6 - kernel_us, "host_us": (step - replay) * 1e6,
                   "weights_floor_us": weight_bytes / bandwidth * 1e6, "copy_TBs": bandwidth / 1e12, "top": top}
            print(json.dumps(row), flush=True)
            rows.append(row)
        prompt = LaneInput(list(range(2048)), 0, 1, list(range(1, 1 + 2048 // 16 + 1)))
        wall = _sync_time(lambda: runner.run([prompt]), 5)
        args = runner._args(runner.inputs.fill([prompt]))
        runner._plan(captured=False)
        with torch.no_grad():
            kernel_us, count, top = _kernels(lambda: runner.fn(*args))
        row = {"model": name, "kind": "prefill", "tokens": 2048, "step_us": wall * 1e6, "kernel_us": kernel_us,
               "kernels": count, "host_and_gaps_us": wall * 1e6 - kernel_us, "top": top}
        print(json.dumps(row), flush=True)
        rows.append(row)
        llm = runner = args = None  # free the batch-64 engine before building the next
        torch.cuda.empty_cache()
        # the same 2k prefill step replayed from a CUDA graph captured at 2048 tokens: if the eager
        # step is host-bound (kernel launches one by one), this is the step without the host
        # (for SSM models also with the SSD scan's chunk-parallel launches on, 256-token chunks for
        # lanes of >= 256 tokens, side by side with the default serial scan)
        from autodeploy.custom_ops import triton_ssd_chunks

        parallel_min = triton_ssd_chunks.PARALLEL_MIN_TOKENS
        for chunk_parallel in (False, True) if "hybrid" in name else (False,):
            triton_ssd_chunks.PARALLEL_MIN_TOKENS = 256 if chunk_parallel else parallel_min
            try:
                captured = LLM(model, max_batch_size=1, max_seq_len=2048 + 16, max_num_tokens=2048,
                               compile_mode="cudagraph", cuda_graph_sizes=[2048], attn_backend="triton",
                               ssm_backend="triton", **BF16).engine.runner
                graphed = _sync_time(lambda: captured.run([prompt]), 5)
            finally:
                triton_ssd_chunks.PARALLEL_MIN_TOKENS = parallel_min
            # only the replay is timed: kernel sum and count would be the eager step's (the
            # chunk-parallel scan launches other kernels), so they are left out
            kind = "prefill, captured" + (", chunk-parallel scan" if chunk_parallel else "")
            row = {"model": name, "kind": kind, "tokens": 2048,
                   "step_us": graphed * 1e6, "kernel_us": None, "kernels": None, "top": []}
            print(json.dumps(row), flush=True)
            rows.append(row)
            captured = None
            torch.cuda.empty_cache()
        model = None
    return rows


# -- sliding-window memory -------------------------------------------------------------------------
def memory(rows: list, budget_gib: float = 20.0) -> list[dict]:
    """KV bytes per sequence of bench-swa-0.7b (5 sliding W=1024 : 1 full layers) at 4k/32k/128k
    context, against a full-length cache for every layer; and how many such sequences fit in a
    fixed KV budget."""
    model = build_model("bench-swa-0.7b", dtype=torch.bfloat16, device="cuda")
    cfg = model.config
    per_token_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * 2  # K and V, bf16
    for context in (4096, 32768, 131072):
        llm = LLM(model, max_batch_size=1, max_seq_len=context, max_num_tokens=256, **BF16)
        pools = llm.cache_bytes()
        sizes = llm.engine.sizes
        full_pool = pools.get("kv_full", 0) / (sizes.num_full_pages + 1) * -(-context // sizes.page_size)
        ring = sum(b for p, b in pools.items() if p.startswith("kv_swa")) / (sizes.max_batch_size + 1)
        ours = full_pool + ring
        full = cfg.num_hidden_layers * per_token_layer * context
        budget = budget_gib * 2**30
        row = {"context": context, "ours_MiB": ours / 2**20, "full_cache_MiB": full / 2**20, "fraction": ours / full,
               "seqs_in_budget_ours": int(budget // ours), "seqs_in_budget_full": int(budget // full),
               "budget_GiB": budget_gib, "pools": {p: b / 2**20 for p, b in pools.items()}}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del llm
        torch.cuda.empty_cache()
    return rows


# -- speculative decoding --------------------------------------------------------------------------
class KnownContinuation(Drafter):
    """Benchmark-only drafter proposing the target's own greedy continuation (from a run without
    speculation): every draft is accepted, which measures what verify steps and replay cost and
    gain when drafts are right (the upper bound of any drafter), independent of the weights."""

    def __init__(self, max_draft_tokens: int, continuation: list[int]):
        self.max_draft_tokens, self.continuation = max_draft_tokens, continuation

    def propose(self, requests, num_tokens):
        return [Draft(self.continuation[len(r.output):len(r.output) + k] if k > 0 else []) for r, k in
                zip(requests, num_tokens)]


def spec(rows: list, k: int = 4, new: int = 256) -> list[dict]:
    """n-gram speculation vs none at batch 1 on bench-hybrid-0.6b, CUDA graphs, on a repetitive
    prompt (a 64-token random phrase repeated 8 times); replay buffer bytes vs (1 + K) state copies."""
    model = build_model("bench-hybrid-0.6b", dtype=torch.bfloat16, device="cuda")
    phrase = torch.randint(0, 32000, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    prompt = [{"prompt_token_ids": phrase * 8}]
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    outs = {}
    for method in ("none", "ngram", "known continuation"):
        sc = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4} if method != "none" else None
        llm = LLM(model, max_batch_size=1, max_seq_len=1024, max_num_tokens=512, compile_mode="cudagraph",
                  speculative_config=sc, **BF16)
        if method == "known continuation":
            llm.engine.drafter = KnownContinuation(k, outs["none"])
        llm.generate([{"prompt_token_ids": phrase}], SamplingParams(max_tokens=16, ignore_eos=True))  # warm-up
        llm.engine.num_steps = 0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = llm.generate(prompt, params)[0].outputs[0]
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        outs[method] = out.token_ids
        pools = llm.cache_bytes()
        row = {"method": method, "k": k if sc else 0, "tok_s": new / elapsed, "steps": llm.engine.num_steps}
        if sc:
            stats = llm.spec_stats
            row.update(mean_accepted_length=stats.mean_accepted_length, acceptance=stats.acceptance_rate,
                       replay_MiB=pools.get("replay", 0) / 2**20,
                       state_copies_MiB=(1 + k) * (pools.get("ssm", 0) + pools.get("conv", 0)) / 2**20)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del llm
        torch.cuda.empty_cache()
    for row in rows[1:]:
        row["speedup"] = row["tok_s"] / rows[0]["tok_s"]
        row["same_tokens"] = outs[row["method"]] == outs["none"]
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=["profile", "prefill", "overhead", "spec", "memory"])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    path = os.path.join(args.out, "suite.json")

    def save() -> None:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    class Rows(list):
        """A section's rows, saved to suite.json as each one comes: a section cut by a time
        limit keeps what it measured."""

        def append(self, row) -> None:
            super().append(row)
            save()

    run = {"profile": lambda rows: profile(["bench-hybrid-0.6b", "bench-swa-0.7b"], rows),
           "prefill": lambda rows: prefill(["bench-hybrid-0.6b", "bench-swa-0.7b"], rows),
           "overhead": overhead, "memory": memory, "spec": spec}
    for section in args.sections:
        t0 = time.perf_counter()
        results[section] = Rows()
        try:
            run[section](results[section])
        except Exception as e:  # one section failing must not lose the others' numbers
            results[section] = {"error": repr(e), "rows": list(results[section])}
            print(f"section {section} failed: {e!r}", flush=True)
        print(f"== {section}: {time.perf_counter() - t0:.0f} s", flush=True)
        save()

if __name__ == "__main__":
    main()
