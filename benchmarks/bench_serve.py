"""Serving benchmark: concurrent streaming clients against the OpenAI-compatible server.

Starts the server on 127.0.0.1 (in this process, its engine on its own thread; the clients are
httpx connections on the same machine), fires CLIENTS streaming /v1/completions at once (some
hanging up mid-stream if --disconnect > 0), waits until the engine is idle and its pools are
empty, and prints throughput and latency percentiles (time to first token, inter-token latency,
end to end) as JSON and as a Markdown row, beside the same requests run offline (LLM.generate) for scale.

    PYTHONPATH=. python benchmarks/bench_serve.py               # the embedded model, 64 clients, CPU
    PYTHONPATH=. python benchmarks/bench_serve.py --device cuda --dtype bfloat16 --compile-mode cudagraph \
        --model bench-hybrid-0.6b --clients 256 --max-batch-size 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time

import torch

from autodeploy import LLM
from autodeploy.models import build_model
from autodeploy.models.tokenizer import byte_tokenizer
from autodeploy.server import LiveServer
from autodeploy.server.load import run_load, summarize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="hybrid", help="zoo or benchmark model name (default hybrid)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compile-mode", default="eager")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--disconnect", type=int, default=16, help="clients that hang up after 2-4 chunks")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", metavar="FILE", help="also write the result here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args.model)
    tokenizer = byte_tokenizer(model.config) if model.config.vocab_size == 256 else None
    llm = LLM(model, tokenizer=tokenizer, device=args.device, dtype=args.dtype, compile_mode=args.compile_mode,
              max_batch_size=args.max_batch_size, max_seq_len=args.prompt_len + args.max_tokens,
              max_num_tokens=max(256, args.max_batch_size))
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    bodies = [{"model": args.model, "prompt": torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist(),
               "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True} for _ in range(args.clients)]
    hang_up = [2 + i % 3 if i < args.disconnect else None for i in range(args.clients)]
    # the same requests offline (LLM.generate, no HTTP, nobody hanging up): what the engine alone does here
    from autodeploy import SamplingParams

    llm.generate([{"prompt_token_ids": b["prompt"]} for b in bodies[:2]], SamplingParams(max_tokens=2))
    start = time.perf_counter()
    offline = llm.generate([{"prompt_token_ids": b["prompt"]} for b in bodies],
                           SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
    offline_tok_s = sum(len(o.outputs[0].token_ids) for o in offline) / (time.perf_counter() - start)
    with LiveServer(llm, args.model) as server:
        asyncio.run(run_load(server.url, bodies[:2]))  # warm-up: first-step costs out of the measurement
        results, seconds = asyncio.run(run_load(server.url, bodies, hang_up))
        engine, deadline = server.loop.engine, time.monotonic() + 30
        while engine.has_unfinished() or engine.requests:
            if time.monotonic() > deadline:
                raise SystemExit("the engine did not go idle after the load")
            time.sleep(0.01)
        engine.pools.assert_empty()
    summary = summarize(results, seconds)
    bad = [r for r, h in zip(results, hang_up) if h is None and len(r.token_ids) != args.max_tokens]
    if bad:
        raise SystemExit(f"{len(bad)} finished clients got fewer than {args.max_tokens} tokens")
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda")
               else f"{platform.machine()} {os.cpu_count()} cores")
    summary.update(offline_tokens_per_s=round(offline_tok_s, 1), model=args.model, device=args.device,
                   machine=machine, torch=torch.__version__,
                   max_batch_size=args.max_batch_size, prompt_len=args.prompt_len, max_tokens=args.max_tokens,
                   threads=torch.get_num_threads(), load_average=[round(x, 1) for x in os.getloadavg()])
    print(json.dumps(summary, indent=2))
    t, i, e = summary["ttft_ms"], summary["itl_ms"], summary["e2e_ms"]
    print(f"| {args.model} | {args.device} | {args.clients} ({summary['disconnected']} hang up) | "
          f"{args.max_batch_size} | {summary['tokens_per_s']:.0f} | {summary['requests_per_s']:.1f} | "
          f"{t['p50']:.0f} / {t['p90']:.0f} / {t['p99']:.0f} | {i['p50']:.0f} / {i['p90']:.0f} / {i['p99']:.0f} | "
          f"{e['p50']:.0f} / {e['p99']:.0f} | {offline_tok_s:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
