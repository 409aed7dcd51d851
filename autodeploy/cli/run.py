"""``autodeploy run``: the self-checking demo, or serving the prompts given, offline."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from autodeploy.cli.options import EXIT_FAILED, EXIT_OK, engine_config, logger, read_prompts, zoo_tokenizer


def cmd_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from autodeploy.demo import DEFAULT_MODEL, load_model, run_demo

    model = args.model or DEFAULT_MODEL
    prompts = read_prompts(args)
    config = engine_config(args)
    if not prompts:
        sampling = [f"--{n.replace('_', '-')}" for n in ("temperature", "top_k", "top_p", "seed")
                    if getattr(args, n) is not None] + (["--ignore-eos"] if args.ignore_eos else [])
        if args.stream or sampling:
            parser.error(f"{' '.join((['--stream'] if args.stream else []) + sampling)} needs prompts "
                         "(--prompt, --prompt-ids or --prompts-file); the self-checking demo is greedy")
        ok = run_demo(model, new_tokens=args.max_tokens if args.max_tokens is not None else 24, config=config)
        return EXIT_OK if ok else EXIT_FAILED

    from autodeploy.api import LLM
    from autodeploy.runtime.sampling import SamplingParams

    params = SamplingParams(
        temperature=args.temperature if args.temperature is not None else 0.0,
        top_k=args.top_k if args.top_k is not None else 0,
        top_p=args.top_p if args.top_p is not None else 1.0,
        seed=args.seed, max_tokens=args.max_tokens if args.max_tokens is not None else 16,
        ignore_eos=args.ignore_eos)
    source, name = load_model(model)
    # a zoo model takes text prompts through the byte-level tokenizer; with token ids only, it prints ids
    text_prompts = any(isinstance(p, str) for p in prompts)
    llm = LLM(source, tokenizer=zoo_tokenizer(source) if text_prompts else None, **config)
    if llm.tokenizer is None and any(isinstance(p, str) for p in prompts):
        raise ValueError(f"text prompts need a tokenizer and model {name!r} has none; give token ids "
                         "(--prompt-ids 1,2,3 or lines of ids in --prompts-file)")
    vocab = getattr(getattr(llm.model, "config", None), "vocab_size", None)
    bad = [t for p in prompts if not isinstance(p, str) for t in p if vocab and not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token id(s) {sorted(set(bad))[:5]} outside the vocabulary of {name!r} (0..{vocab - 1})")
    requests = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompts]
    logger.info("serving %d prompts on %s", len(requests), name)
    start = time.perf_counter()
    final: dict[int, Any] = {}
    if args.stream:
        final = _stream(llm, requests, params)
    else:
        bar = _progress(len(requests), len(requests) > 1 and sys.stderr.isatty())
        try:
            for out in llm.stream(requests, params):
                if out.finished:
                    final[out.prompt_index] = out
                    bar.update(1)
        finally:
            bar.close()
        for i in range(len(requests)):
            out = final[i]
            c = out.outputs[0]
            print(f"[{i}] prompt {len(out.prompt_token_ids)} tokens -> {len(c.token_ids)} tokens "
                  f"({c.finish_reason}): {_ids_text(c.token_ids)}")
            if c.text is not None:
                print(f"    text: {c.text!r}")
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in final.values())
    line = (f"{len(requests)} prompt(s), {generated} tokens in {llm.engine.num_steps} steps, {seconds:.2f} s "
            f"({generated / max(seconds, 1e-9):.0f} tok/s) on {llm.config.device}")
    if llm.spec_stats is not None:
        line += f"; speculative acceptance {llm.spec_stats.acceptance_rate:.2f}"
    print(line)
    if llm.config.tensor_parallel_size > 1:
        from autodeploy import distributed

        pools, backend = llm.cache_bytes(), distributed.backend_for(llm.config.device)
        print(f"tensor parallel: {llm.config.tensor_parallel_size} ranks ({backend}); "
              f"caches per rank {sum(pools.values()) / 1024:.0f} KiB: "
              + ", ".join(f"{pool} {b / 1024:.0f} KiB" for pool, b in pools.items()))
    return EXIT_OK


def _stream(llm, requests: list, params) -> dict[int, Any]:
    """Print tokens as they arrive: inline for one prompt, one line per update for several."""
    single = len(requests) == 1
    seen: dict[int, int] = {}
    texts: dict[int, str] = {}
    final: dict[int, Any] = {}
    for out in llm.stream(requests, params):
        i, c = out.prompt_index, out.outputs[0]
        new = c.token_ids[seen.get(i, 0):]
        seen[i] = len(c.token_ids)
        if c.text is not None:
            prev = texts.get(i, "")
            piece = c.text[len(prev):] if c.text.startswith(prev) else c.text
            texts[i] = c.text
            shown = piece if single else repr(piece)
        else:
            shown = " ".join(map(str, new))
        if single:
            if seen[i] == len(new):  # the first update
                print(f"[{i}]" + (" " if c.text is not None else ""), end="")
            print(shown if c.text is not None else " " + shown, end="", flush=True)
        else:
            print(f"[{i}] +{shown}", flush=True)
        if out.finished:
            final[i] = out
            if single:
                print()
            print(f"[{i}] done ({c.finish_reason}): {len(c.token_ids)} tokens", flush=True)
    return final


def _progress(total: int, enabled: bool):
    """A progress bar on stderr (tqdm if importable), or a no-op; ``update(n)`` and ``close()``."""

    class Null:
        def update(self, n: int = 1) -> None:
            pass

        def close(self) -> None:
            pass

    if not enabled:
        return Null()
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="prompt", desc="serving", file=sys.stderr, leave=False)
    except ImportError:
        class Line(Null):
            done = 0

            def update(self, n: int = 1) -> None:
                self.done += n
                print(f"\rserved {self.done}/{total} prompts", end="", file=sys.stderr, flush=True)

            def close(self) -> None:
                print("\r" + " " * 40 + "\r", end="", file=sys.stderr, flush=True)

        return Line()


def _ids_text(ids: list[int], limit: int = 64) -> str:
    return " ".join(map(str, ids[:limit])) + (f" ... ({len(ids)} tokens)" if len(ids) > limit else "")

