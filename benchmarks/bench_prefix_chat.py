"""Multi-turn chat with and without prefix caching: conversations sharing a system prompt, each
turn the previous prompt + answer + a new user message, all conversations of a turn served
together. Measures per run the time to first token (mean, p50, p90 over every request), the
wall time, prompt tokens computed and output tokens per second, the prefix cache's hit rate and
reused tokens, the snapshot pool's bytes, and whether the tokens with caching equal those
without (they do in float32; in bfloat16 a prefill split differently may round differently).

    python benchmarks/bench_prefix_chat.py --out prefix_chat.json           # CUDA: real sizes
    python benchmarks/bench_prefix_chat.py --cpu --out prefix_chat_cpu.json  # the CPU quick run

Each engine first serves one warm-up request. GPU defaults: bench-hybrid-0.6b, 64 conversations
x 8 turns, a 1024-token system prompt, 64-token user messages and answers. CPU defaults: the zoo
hybrid, 4 x 3, 64-token system prompt, 8-token messages and answers.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import time

import torch

from autodeploy import LLM, SamplingParams
from autodeploy.models import build_model
from autodeploy.runtime.pools import POOL_SNAPSHOTS

GPU = dict(model="bench-hybrid-0.6b", conversations=64, turns=8, system_len=1024, user_len=64, answer_len=64)
CPU = dict(model="hybrid", conversations=4, turns=3, system_len=64, user_len=8, answer_len=8)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_chat(llm: LLM, args, vocab: int) -> dict:
    """Serve every turn of every conversation; returns timings, counts and the tokens."""
    g = random.Random(args.seed)
    system = [g.randrange(vocab) for _ in range(args.system_len)]
    convs = [system + [g.randrange(vocab) for _ in range(args.user_len)] for _ in range(args.conversations)]
    params = SamplingParams(max_tokens=args.answer_len, ignore_eos=True)
    ttfts, answers, per_turn = [], [], []
    start = time.perf_counter()
    prompt_tokens = computed = 0
    for turn in range(args.turns):
        t0 = time.perf_counter()
        first: dict[int, float] = {}
        final: dict[int, list[int]] = {}
        cached: dict[int, int] = {}
        for out in llm.stream([{"prompt_token_ids": c} for c in convs], params):
            first.setdefault(out.prompt_index, time.perf_counter() - t0)
            if out.finished:
                final[out.prompt_index] = out.outputs[0].token_ids
                cached[out.prompt_index] = out.num_cached_tokens
        if llm.config.device.startswith("cuda"):
            torch.cuda.synchronize()
        turn_s = time.perf_counter() - t0
        ttfts += first.values()
        outs = [final[i] for i in range(len(convs))]
        answers.append(outs)
        n_prompt = sum(map(len, convs))
        prompt_tokens += n_prompt
        computed += n_prompt - sum(cached.values())
        per_turn.append({"turn": turn, "seconds": turn_s, "mean_ttft_s": statistics.mean(first.values()),
                         "prompt_tokens": n_prompt, "cached_tokens": sum(cached.values())})
        convs = [c + o + [g.randrange(vocab) for _ in range(args.user_len)] for c, o in zip(convs, outs)]
    wall = time.perf_counter() - start
    generated = args.conversations * args.turns * args.answer_len
    return {"wall_s": wall, "ttft_mean_s": statistics.mean(ttfts), "ttft_p50_s": _percentile(ttfts, 0.5),
            "ttft_p90_s": _percentile(ttfts, 0.9), "output_tokens_per_s": generated / wall,
            "prompt_tokens": prompt_tokens, "prompt_tokens_computed": computed, "per_turn": per_turn,
            "answers": answers}


def warm_up(llm: LLM, args, vocab: int) -> None:
    """One request of the first turn's length on tokens no conversation uses (kernel compiles and
    allocator growth happen here, not in turn 0's timings); then an empty prefix cache and stats."""
    g = random.Random(args.seed + 1)
    llm.generate([{"prompt_token_ids": [g.randrange(vocab) for _ in range(args.system_len + args.user_len)]}],
                 SamplingParams(max_tokens=2, ignore_eos=True))
    if llm.engine.prefix is not None:
        llm.engine.reset_prefix_cache()
        llm.engine.prefix.stats = type(llm.engine.prefix.stats)()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the CPU quick run even when a GPU is present")
    p.add_argument("--model", help="zoo or benchmark model name")
    for name in ("conversations", "turns", "system_len", "user_len", "answer_len"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name)
    p.add_argument("--prefix-snapshots", type=int, help="snapshot pool size (default: the engine's)")
    p.add_argument("--snapshot-interval", type=int, help="tokens between prefill snapshots (default: the engine's)")
    p.add_argument("--dtype", help="default: float32 on the CPU, the model's on a GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu
    for key, value in (GPU if cuda else CPU).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    device = "cuda" if cuda else "cpu"
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    max_seq_len = args.system_len + args.turns * (args.user_len + args.answer_len) + args.user_len
    model = build_model(args.model, dtype=getattr(torch, dtype))
    options = dict(device=device, dtype=dtype, max_batch_size=args.conversations, max_seq_len=max_seq_len,
                   self_check=False)
    result = {"config": {k: getattr(args, k) for k in (*GPU, "seed")}, "device": device, "dtype": dtype,
              "torch": torch.__version__, "host": platform.node(),
              "gpu": torch.cuda.get_device_name() if cuda else None,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    runs = {}
    for caching in (False, True):
        extra = dict(enable_prefix_caching=caching)
        if caching and args.prefix_snapshots is not None:
            extra["prefix_snapshots"] = args.prefix_snapshots
        if caching and args.snapshot_interval is not None:
            extra["prefix_snapshot_interval"] = args.snapshot_interval
        llm = LLM(model, **options, **extra)
        engine = llm.engine
        warm_up(llm, args, model.config.vocab_size)
        taken = engine.pools.snapshots.num_taken if caching and engine.pools.snapshots else 0
        evicted = engine.pools.snapshots.num_evicted if caching and engine.pools.snapshots else 0
        run = run_chat(llm, args, model.config.vocab_size)
        run["cache_bytes"] = llm.cache_bytes()
        if caching:
            stats = engine.prefix.stats
            run.update(hit_rate=stats.hit_rate, reused_tokens=stats.num_cached_tokens,
                       hit_requests=stats.num_hit_requests, requests=stats.num_requests,
                       snapshot_bytes=run["cache_bytes"].get(POOL_SNAPSHOTS, 0),
                       snapshots_taken=(engine.pools.snapshots.num_taken if engine.pools.snapshots else 0) - taken,
                       snapshots_evicted=(engine.pools.snapshots.num_evicted if engine.pools.snapshots else 0)
                       - evicted,
                       pages_evicted=engine.pools.pages.num_evicted)
        runs["with_caching" if caching else "without_caching"] = run
        del llm, engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    a, b = runs["without_caching"].pop("answers"), runs["with_caching"].pop("answers")
    pairs = [(x, y) for turn_a, turn_b in zip(a, b) for x, y in zip(turn_a, turn_b)]
    result.update(runs, tokens_equal_fraction=sum(x == y for x, y in pairs) / len(pairs),
                  ttft_speedup=runs["without_caching"]["ttft_mean_s"] / runs["with_caching"]["ttft_mean_s"],
                  throughput_speedup=runs["with_caching"]["output_tokens_per_s"]
                  / runs["without_caching"]["output_tokens_per_s"])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    w, c = runs["without_caching"], runs["with_caching"]
    print(f"{args.model} on {device} ({dtype}): {args.conversations} conversations x {args.turns} turns, system "
          f"{args.system_len} tokens")
    print(f"  without caching: TTFT mean {w['ttft_mean_s'] * 1e3:.1f} ms, {w['output_tokens_per_s']:.1f} tok/s, "
          f"{w['prompt_tokens_computed']} prompt tokens computed")
    print(f"  with caching:    TTFT mean {c['ttft_mean_s'] * 1e3:.1f} ms, {c['output_tokens_per_s']:.1f} tok/s, "
          f"{c['prompt_tokens_computed']} computed; hit rate {c['hit_rate']:.1%}, snapshots "
          f"{c['snapshot_bytes'] / 2**20:.1f} MiB")
    print(f"  tokens equal: {result['tokens_equal_fraction']:.1%}; wrote {args.out}")


if __name__ == "__main__":
    main()
