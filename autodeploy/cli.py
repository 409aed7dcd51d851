"""Command line: ``autodeploy`` / ``python -m autodeploy``.

    autodeploy                                   # = autodeploy run: the self-checking demo, ends in "OK"
    autodeploy run --model llama --prompt-ids 1,2,3 --max-tokens 8 --stream
    autodeploy graph hybrid --out graphs/        # what the transforms did, pictures before/after
    autodeploy serve llama --port 8000           # an OpenAI-compatible HTTP server
    autodeploy info                              # backends, devices, versions
    autodeploy bench                             # benchmarks/bench_decode.py on a GPU, else a CPU quick run

Exit codes: 0 ok, 1 a check failed, 2 usage error, 3 bad input (missing model, bad option value).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BAD_INPUT = 0, 1, 2, 3
COMMANDS = ("run", "serve", "graph", "info", "bench")
BACKEND_CHOICES = ("auto", "torch", "triton", "flashinfer")
ID_LIST = re.compile(r"^\s*-?\d+(\s*,\s*-?\d+)*\s*,?\s*$")

logger = logging.getLogger("autodeploy")


# -- argument types ----------------------------------------------------------------------------------


def token_ids(text: str) -> list[int]:
    """``"1,2,3"`` -> [1, 2, 3] (an argparse type: a bad list is a usage error)."""
    if not ID_LIST.match(text):
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}")
    return [int(t) for t in text.split(",") if t.strip()]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def speculative(text: str) -> dict:
    """``ngram:K`` or ``draft:MODEL:K`` (MODEL a zoo name or checkpoint directory) -> speculative_config."""
    parts = text.split(":")
    try:
        if parts[0] == "ngram" and len(parts) == 2:
            return {"method": "ngram", "num_speculative_tokens": int(parts[1])}
        if parts[0] in ("draft", "draft_model") and len(parts) >= 3:
            return {"method": "draft_model", "model": ":".join(parts[1:-1]), "num_speculative_tokens": int(parts[-1])}
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected ngram:K or draft:MODEL:K (K draft tokens), got {text!r}")


# -- parser ------------------------------------------------------------------------------------------


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from autodeploy import __version__
    from autodeploy.api import DTYPES
    from autodeploy.models import ZOO
    from autodeploy.runtime.runner import COMPILE_MODES
    from autodeploy.transforms.pipeline import PERF_TRANSFORMS

    raw = argparse.RawDescriptionHelpFormatter

    def wrap(text: str) -> str:
        return textwrap.fill(text, 88)
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given before or after the command, neither place overrides the other with a default
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log what autodeploy does (INFO level of logger 'autodeploy')")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error instead of one line")

    engine = argparse.ArgumentParser(add_help=False)
    eg = engine.add_argument_group("engine options (default: autodeploy.DeployConfig's)")
    eg.add_argument("--max-batch-size", type=int, metavar="N", help="sequences served together (lanes)")
    eg.add_argument("--max-seq-len", type=int, metavar="N", help="prompt + generated tokens per request")
    eg.add_argument("--max-num-tokens", type=int, metavar="N", help="token budget per step (prefill chunk)")
    eg.add_argument("--page-size", type=int, metavar="N", help="tokens per full-attention KV page")
    eg.add_argument("--device", metavar="DEV", help="cpu or cuda[:i] (default: cuda when a GPU is visible)")
    eg.add_argument("--dtype", choices=sorted(DTYPES), help="model and cache dtype (default: float32 on the CPU, the checkpoint's on a GPU)")
    eg.add_argument("--attn-backend", choices=BACKEND_CHOICES, help="cached attention backend (default auto)")
    eg.add_argument("--ssm-backend", choices=BACKEND_CHOICES, help="cached Mamba2 scan/conv backend (default auto)")
    eg.add_argument("--compile-mode", choices=sorted(COMPILE_MODES), metavar="MODE",
                    help="eager, inductor, cudagraph or inductor+cudagraph (default: cudagraph on a GPU, else eager)")
    eg.add_argument("--no-transform", action="append", choices=PERF_TRANSFORMS, metavar="NAME", default=None,
                    help=f"switch a performance transform off (repeatable): {', '.join(PERF_TRANSFORMS)}")
    eg.add_argument("--speculative", type=speculative, metavar="SPEC",
                    help="speculative decoding: ngram:K (prompt lookup) or draft:MODEL:K (a draft model)")
    eg.add_argument("--enable-prefix-caching", action="store_true", default=None,
                    help="reuse the caches of earlier requests' common prefixes, exactly (docs/prefix_caching.md)")

    parser = argparse.ArgumentParser(
        prog="autodeploy", parents=[common], formatter_class=raw,
        description="Turn a transformers causal LM into a cached inference engine, run it, look inside it.",
        epilog="With no command, 'run' is meant: 'autodeploy' runs the self-checking demo.\n"
               "Exit codes: 0 ok, 1 check failed, 2 usage error, 3 bad input. See docs/CLI.md.")
    parser.add_argument("--version", action="version", version=f"autodeploy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs: dict[str, argparse.ArgumentParser] = {}

    run = subs["run"] = sub.add_parser(
        "run", parents=[common, engine], formatter_class=raw,
        help="serve prompts, or run the self-checking demo (the default command)",
        description=wrap("Serve prompts on a model. Without prompt options it runs the self-checking demo: "
                         "random prompts, every token compared with transformers, ends in OK (exit 0) or FAILED "
                         "(exit 1)."),
        epilog="examples:\n  autodeploy run\n  autodeploy run --model llama --prompt-ids 1,2,3 --max-tokens 8\n"
               "  autodeploy run --model ./my-checkpoint --prompt 'Hello' --stream --temperature 0.8 --seed 0\n"
               "  autodeploy run --prompts-file prompts.txt --max-batch-size 16")
    run.add_argument("--model", default=None, metavar="MODEL",
                     help=f"zoo name ({', '.join(ZOO)}) or a checkpoint directory (default: hybrid, the "
                          "embedded demo model)")
    pg = run.add_argument_group("prompts (none: the self-checking demo)")
    pg.add_argument("--prompt", action="append", dest="prompts", default=[], metavar="TEXT",
                    help="a text prompt (needs a tokenizer); repeatable")
    pg.add_argument("--prompt-ids", action="append", dest="prompts", type=token_ids, metavar="IDS",
                    help="a prompt as token ids, e.g. 1,2,3; repeatable, in order with --prompt")
    pg.add_argument("--prompts-file", metavar="FILE",
                    help="one prompt per line, after those above: token ids as 1,2,3 or text (with a tokenizer); "
                         "blank lines skipped")
    sg = run.add_argument_group("sampling (vLLM's SamplingParams)")
    sg.add_argument("--max-tokens", type=int, metavar="N", help="new tokens per prompt (default 16; demo 24)")
    sg.add_argument("--temperature", type=float, metavar="T", help="0 = greedy (default)")
    sg.add_argument("--top-k", type=int, metavar="K", help="keep the K most likely tokens (0 or -1 = off)")
    sg.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling (1.0 = off)")
    sg.add_argument("--seed", type=int, help="per-request sampling seed")
    sg.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    tg = run.add_argument_group("tensor parallelism (README: Tensor parallelism)")
    tg.add_argument("--tp", type=positive_int, metavar="N",
                    help="split the model over N ranks (GPUs with --device cuda, else CPU processes): relaunches "
                         "itself under torchrun --nproc-per-node N; rank 0 prints")
    og = run.add_argument_group("output")
    og.add_argument("--stream", action="store_true", help="print tokens as they are generated (LLM.stream)")

    graph = subs["graph"] = sub.add_parser(
        "graph", parents=[common, engine], formatter_class=raw,
        help="show what the transforms did and draw the model before/after",
        description=wrap("Build the engine for MODEL, print what each transform did (ops matched, prepare "
                         "nodes, caches per pool for the configured sizes, backends) and write layer-level "
                         "pictures of the graph before and after the transforms: MODEL_before.svg, "
                         "MODEL_after.svg, MODEL.html, MODEL_summary.txt."),
        epilog="example:\n  autodeploy graph hybrid --out graphs/ --max-batch-size 4")
    graph.add_argument("model", metavar="MODEL", help="zoo name or checkpoint directory")
    graph.add_argument("--out", default="graphs", metavar="DIR", help="where the pictures go (default graphs/)")

    info = subs["info"] = sub.add_parser(
        "info", parents=[common], help="backends, devices and versions available here",
        description="Which cached-op backends (torch, triton, flashinfer) can run on which device here, why not "
                    "where they cannot, and the versions of torch, transformers and triton.")
    info.add_argument("--json", action="store_true", help="print it as JSON")

    bench = subs["bench"] = sub.add_parser(
        "bench", parents=[common], formatter_class=raw,
        help="decode benchmark (GPU) or a quick CPU throughput run",
        description=wrap("With a CUDA GPU: runs benchmarks/bench_decode.py; options below are translated and "
                         "any other argument is passed through. Without one (or with --cpu): a quick throughput "
                         "run of a zoo model on this CPU, labelled as such."),
        epilog="examples:\n  autodeploy bench                         # GPU: bench_decode.py defaults\n"
               "  autodeploy bench --batch-size 8 -- --hf   # GPU: pass --hf through\n"
               "  autodeploy bench --cpu --batch-size 4")
    bench.add_argument("--cpu", action="store_true", help="the CPU quick run even when a GPU is present")
    bench.add_argument("--model", default=None, metavar="MODEL",
                       help="zoo model (CPU default: hybrid; GPU default: bench_decode.py's)")
    bench.add_argument("--batch-size", type=int, metavar="N", help="sequences decoded together (CPU default 4)")
    bench.add_argument("--prompt-len", type=int, metavar="N", help="prompt tokens per sequence (CPU default 32)")
    bench.add_argument("--new-tokens", type=int, metavar="N", help="new tokens per sequence (CPU default 32)")
    serve = subs["serve"] = sub.add_parser(
        "serve", parents=[common, engine], formatter_class=raw,
        help="an OpenAI-compatible HTTP server (completions, chat, streaming, /metrics)",
        description=wrap("Serve MODEL over the OpenAI HTTP API: POST /v1/completions, POST /v1/chat/completions "
                         "(stream: true for server-sent events), GET /v1/models, GET /health, GET /metrics "
                         "(Prometheus). Requests from all connections are batched by one engine. Stops on "
                         "SIGINT/SIGTERM after in-flight requests finish (--shutdown-timeout). Needs the 'serve' "
                         "extra: pip install 'autodeploy[serve]'."),
        epilog="examples:\n  autodeploy serve                       # the embedded demo model (byte-level tokenizer)\n"
               "  autodeploy serve ./my-checkpoint --port 8000 --max-batch-size 32\n"
               "  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\\n"
               "       -d '{\"model\": \"hybrid\", \"prompt\": \"Hello\", \"max_tokens\": 8}'")
    serve.add_argument("model", nargs="?", default=None, metavar="MODEL",
                       help=f"zoo name ({', '.join(ZOO)}; these come with a byte-level tokenizer) or a checkpoint "
                            "directory, as 'run --model' takes (default: hybrid, the embedded demo model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    serve.add_argument("--served-model-name", metavar="NAME",
                       help="the model id clients send and /v1/models lists (default: MODEL as given)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                       help="on SIGINT/SIGTERM, seconds in-flight requests may take to finish before they are "
                            "aborted (default 30)")
    serve.add_argument("--tp", type=positive_int, metavar="N", help="tensor parallelism: not supported by serve yet")
    return parser, subs


def _with_default_command(argv: list[str]) -> list[str]:
    """Insert "run" where the command would be, when none is given."""
    i = 0
    while i < len(argv) and argv[i] in ("-v", "--verbose", "--debug"):
        i += 1
    if i < len(argv) and (argv[i] in COMMANDS or argv[i] in ("-h", "--help", "--version")):
        return argv
    return [*argv[:i], "run", *argv[i:]]


def _unknown_command(argv: list[str]) -> str | None:
    """The word where the command goes, if it is not an option and names no command."""
    i = 0
    while i < len(argv) and argv[i] in ("-v", "--verbose", "--debug"):
        i += 1
    if i < len(argv) and not argv[i].startswith("-") and argv[i] not in COMMANDS:
        return argv[i]
    return None


# -- helpers -----------------------------------------------------------------------------------------


def _engine_config(args: argparse.Namespace) -> dict[str, Any]:
    """The LLM options given on the command line (the rest keep DeployConfig's defaults)."""
    names = ("max_batch_size", "max_seq_len", "max_num_tokens", "page_size", "device", "dtype", "attn_backend",
             "ssm_backend", "compile_mode", "enable_prefix_caching")
    config = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if getattr(args, "tp", None) is not None:
        config["tensor_parallel_size"] = args.tp
    if getattr(args, "no_transform", None):
        config["perf_transforms"] = {name: False for name in args.no_transform}
    device = config.get("device", "cpu")
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is visible here (see 'autodeploy info')")
    if getattr(args, "speculative", None):
        spec = dict(args.speculative)
        if spec["method"] == "draft_model":
            from autodeploy.demo import load_model

            spec["model"] = load_model(spec["model"])[0]
        config["speculative_config"] = spec
    return config


def _read_prompts(args: argparse.Namespace) -> list[list[int] | str]:
    prompts: list[list[int] | str] = list(args.prompts)  # --prompt / --prompt-ids in command-line order
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
        for line in path.read_text().splitlines():
            if line.strip():
                prompts.append([int(t) for t in line.split(",") if t.strip()] if ID_LIST.match(line) else line)
    return prompts


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


# -- commands ----------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from autodeploy.demo import DEFAULT_MODEL, load_model, run_demo

    model = args.model or DEFAULT_MODEL
    prompts = _read_prompts(args)
    config = _engine_config(args)
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
    llm = LLM(source, tokenizer=_zoo_tokenizer(source) if text_prompts else None, **config)
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


def _zoo_tokenizer(source: Any) -> Any:
    """The byte-level tokenizer for a zoo model instance (they have none of their own), else None:
    a checkpoint directory brings its own tokenizer, if it has one."""
    import torch

    from autodeploy.models.tokenizer import byte_tokenizer

    if isinstance(source, torch.nn.Module) and getattr(getattr(source, "config", None), "vocab_size", None) == 256:
        return byte_tokenizer(source.config)
    return None


def cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.tp is not None and args.tp > 1:
        raise ValueError("serve --tp is not supported yet: serve one rank, or run tensor-parallel offline with "
                         "'autodeploy run --tp N' or LLM under torchrun")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    try:
        from autodeploy.server import serve
    except ImportError as e:
        raise ValueError(f"serve needs the server packages ({e.name} is missing): pip install 'autodeploy[serve]'") \
            from e
    from autodeploy.api import LLM
    from autodeploy.demo import DEFAULT_MODEL, load_model

    model = args.model or DEFAULT_MODEL
    source, _ = load_model(model)
    llm = LLM(source, tokenizer=_zoo_tokenizer(source), **_engine_config(args))
    serve(llm, args.served_model_name or model, args.host, args.port, args.shutdown_timeout,
          log_level="info" if getattr(args, "verbose", False) else "warning")
    return EXIT_OK


def cmd_graph(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from autodeploy.demo import load_model
    from autodeploy.graph_view import _write_views

    source, name = load_model(args.model)
    paths, summary = _write_views(source, args.out, name=name, **_engine_config(args))
    print(summary)
    print("wrote:")
    for p in paths:
        print(f"  {p}")
    return EXIT_OK


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def gather_info() -> dict[str, Any]:
    """Versions, devices and which backend can run each op family on each device (and why not)."""
    import torch

    from autodeploy import __version__, backends

    versions = {"autodeploy": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "transformers": _version("transformers"), "triton": _version("triton"),
                "flashinfer": _version("flashinfer-python"), "networkx": _version("networkx")}
    if versions["flashinfer"] == "not installed" and importlib.util.find_spec("flashinfer") is not None:
        versions["flashinfer"] = "installed"
    devices: dict[str, str | None] = {"cpu": None}
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
        devices["cuda"] = None
    else:
        cuda_build = torch.version.cuda
        devices["cuda"] = ("torch is a CPU-only build" if cuda_build is None
                           else f"no CUDA device is visible (torch built for CUDA {cuda_build})")
    families = list(backends.CACHED_OPS)
    table: dict[str, dict[str, Any]] = {}
    for device in ("cpu", "cuda"):
        table[device] = {}
        for backend in backends.PREFERENCE[::-1]:
            reason = devices[device] if device == "cuda" and devices[device] else None
            reason = reason or backends.unavailable_reason(backend, device)
            ops = [f for f in families if backend in backends.CACHED_OPS[f]]
            if reason is None and not ops:
                reason = "no cached ops registered for it"
            table[device][backend] = {"available": reason is None, "reason": reason, "families": ops}
        auto = {}
        for family in families if not (device == "cuda" and devices["cuda"]) else ():
            try:
                auto[family] = backends.resolve(family, "auto", device)
            except (ValueError, StopIteration):
                auto[family] = None
        table[device]["auto"] = auto
    from autodeploy.runtime.runner import COMPILE_MODES

    return {"versions": versions, "devices": {"cpu": f"{torch.get_num_threads()} threads", "gpus": gpus,
                                              "cuda": devices["cuda"] or "available"},
            "backends": table, "compile_modes": sorted(COMPILE_MODES),
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}


def cmd_info(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    data = gather_info()
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print("versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()))
    dev = data["devices"]
    print(f"devices: cpu ({dev['cpu']}); cuda: " + ("; ".join(dev["gpus"]) if dev["gpus"] else dev["cuda"]))
    for device, rows in data["backends"].items():
        print(f"backends on {device}:")
        for backend, row in rows.items():
            if backend == "auto":
                continue
            state = "available" if row["available"] else f"unavailable: {row['reason']}"
            if backend == "triton" and device == "cpu" and row["available"] and data["triton_interpret"]:
                state += " (TRITON_INTERPRET=1: the interpreter, slow, for tests)"
            print(f"  {backend:<11} {state}" + (f"  [{', '.join(row['families'])}]" if row["families"] else ""))
        auto = rows["auto"]
        if auto:
            print("  auto picks: " + ", ".join(f"{f}={b or 'none'}" for f, b in auto.items()))
    print("compile modes: " + ", ".join(data["compile_modes"]))
    from autodeploy.models import ZOO

    print("zoo models: " + ", ".join(ZOO))
    return EXIT_OK


def _bench_script() -> Path | None:
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
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
        root = str(Path(__file__).resolve().parent.parent)  # the script imports this autodeploy
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


# -- main --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _logging(verbose: bool):
    """INFO (verbose) or WARNING on logger 'autodeploy' with a stderr handler; restored afterwards.
    transformers is kept to errors (its "falling back to torch" notices are expected here)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved_level, saved_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    hf = None
    try:
        from transformers.utils import logging as hf

        hf_level, hf_bars = hf.get_verbosity(), hf.is_progress_bar_enabled()
        hf.set_verbosity_error()
        if not verbose:
            hf.disable_progress_bar()  # "Loading weights" bars
    except ImportError:
        pass
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
        logger.propagate = saved_propagate
        if hf is not None:
            hf.set_verbosity(hf_level)
            if hf_bars:
                hf.enable_progress_bar()


def _launch_tensor_parallel(argv: list[str], tp: int, verbose: bool) -> int:
    """Run ``autodeploy ARGV`` in ``tp`` processes under torchrun (torch.distributed.run, a free
    local port); returns the exit code of the first rank that failed, else 0."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run as torchrun

    if not verbose:  # a failing rank prints its own one-line error; the agent's report repeats it
        for name in ("torch.distributed.elastic", "torch.distributed.run"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // tp)))  # CPU ranks share the cores
    launch = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={tp}", "--module", "autodeploy", *argv])
    try:
        torchrun(launch)
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        return next((c for c in codes if c > 0), EXIT_FAILED)
    return EXIT_OK


def _under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _one_line(exc: BaseException) -> str:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(msg).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = build_parser()
    try:
        word = _unknown_command(argv)
        if word is not None:  # run takes no positional argument: a word there is a mistyped command
            parser.error(f"unknown command {word!r}; commands: {', '.join(COMMANDS)} (none given: run)")
        argv = _with_default_command(argv)
        args, extra = parser.parse_known_args(argv)
        if extra and extra[0] == "--":
            extra = extra[1:]
        if extra and args.command != "bench":
            subs[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # argparse: --help, --version (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    debug = getattr(args, "debug", False)
    from autodeploy.export import ExportError

    commands = {"run": cmd_run, "serve": cmd_serve, "graph": cmd_graph, "info": cmd_info}
    tp = getattr(args, "tp", None)
    if args.command == "run" and tp != 1 and _under_torchrun() and os.environ["RANK"] != "0":
        sys.stdout = open(os.devnull, "w")  # every rank computes the same outputs; rank 0 prints them
    try:
        with _logging(getattr(args, "verbose", False)):
            if args.command == "run" and tp is not None and tp > 1 and not _under_torchrun():
                return _launch_tensor_parallel(argv, tp, getattr(args, "verbose", False))
            if args.command == "bench":
                return cmd_bench(args, subs["bench"], extra)
            return commands[args.command](args, subs[args.command])
    except SystemExit as e:  # a usage error found after parsing (parser.error)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except (ValueError, FileNotFoundError, NotADirectoryError, TypeError, KeyError, ExportError) as e:
        if debug:
            raise
        print(f"autodeploy: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("autodeploy: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # | head
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
