"""``autodeploy bench``: benchmarks/bench_decode.py on a GPU, else a quick throughput run on the CPU."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from autodeploy.cli.options import EXIT_OK


def _bench_script() -> Path | None:
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        path = base / "benchmarks" / "bench_decode.py"
        if path.is_file():
            return path
    return None


def cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser, extra: list[str]) -> int:
    import torch

    if torch.cuda.is_available() and not args.cpu:
        script = _bench_script()
        if script is None:
            raise FileNotFoundError("benchmarks/bench_decode.py not found: it lives in the source checkout; "
                                    "run from the repository (or use --cpu)")
        cmd = [sys.executable, str(script)]
        for flag, value in (("--model", args.model), ("--batch", args.batch_size), ("--prompt", args.prompt_len),
                            ("--new", args.new_tokens)):
            if value is not None:
                cmd += [flag, str(value)]
        cmd += extra
        print("+ " + " ".join(cmd), flush=True)
        root = str(Path(__file__).resolve().parents[2])  # the script imports this autodeploy
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        return subprocess.run(cmd, env=env).returncode
    if extra:
        print(f"autodeploy: note: CPU quick run: ignoring GPU benchmark arguments {extra}", file=sys.stderr)
    return _cpu_bench(args)


def _cpu_bench(args: argparse.Namespace) -> int:
    import torch

    from autodeploy.api import LLM
    from autodeploy.demo import load_model
    from autodeploy.runtime.sampling import SamplingParams

    model = args.model or "hybrid"
    batch = args.batch_size if args.batch_size is not None else 4
    prompt_len = args.prompt_len if args.prompt_len is not None else 32
    new = args.new_tokens if args.new_tokens is not None else 32
    for flag, value in (("--batch-size", batch), ("--prompt-len", prompt_len), ("--new-tokens", new)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive int, got {value}")
    why = "--cpu given" if torch.cuda.is_available() else "no CUDA GPU found"
    print(f"CPU quick run ({why}): not the GPU benchmark (benchmarks/bench_decode.py); "
          f"{torch.get_num_threads()} CPU threads, float32, eager")
    source, name = load_model(model)
    llm = LLM(source, max_batch_size=batch, max_seq_len=prompt_len + new, max_num_tokens=max(64, batch))
    vocab = llm.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    engine = llm.engine
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    steps0 = engine.num_steps
    t0 = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    reqs = [engine.requests[i] for i in ids]
    while any(not r.output for r in reqs):
        engine.step()
    t1 = time.perf_counter()
    prefill_steps = engine.num_steps - steps0
    while engine.has_unfinished():
        engine.step()
    t2 = time.perf_counter()
    for i in ids:
        engine.requests.pop(i)
    decode_steps = engine.num_steps - steps0 - prefill_steps
    decoded = sum(len(r.output) - 1 for r in reqs)
    total = sum(len(r.output) for r in reqs)
    print(f"model: {name} ({type(llm.model).__name__}, {sum(p.numel() for p in llm.model.parameters()) / 1e6:.2f} M "
          f"parameters), build {llm.build_seconds:.2f} s")
    print(f"batch {batch} x prompt {prompt_len} tokens, {new} new tokens each")
    print(f"prefill: {prefill_steps} steps, {t1 - t0:.3f} s to every first token")
    print(f"decode: {decode_steps} steps, {decoded} tokens in {t2 - t1:.3f} s = "
          f"{decoded / max(t2 - t1, 1e-9):.0f} tok/s "
          f"({1e3 * (t2 - t1) / max(decode_steps, 1):.1f} ms/step)")
    print(f"overall: {total} tokens in {t2 - t0:.3f} s = {total / max(t2 - t0, 1e-9):.0f} tok/s (CPU)")
    return EXIT_OK

