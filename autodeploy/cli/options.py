"""The command line's shared parts: the argument types, the parser of every command, and the
engine options and prompts read from the parsed arguments."""

from __future__ import annotations

import argparse
import logging
import re
import textwrap
from pathlib import Path
from typing import Any

from autodeploy import backends

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BAD_INPUT = 0, 1, 2, 3
COMMANDS = ("run", "serve", "graph", "info", "bench")
BACKEND_CHOICES = ("auto", *backends.BACKENDS)
ID_LIST = re.compile(r"^\s*-?\d+(\s*,\s*-?\d+)*\s*,?\s*$")

logger = logging.getLogger("autodeploy")


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
    eg.add_argument("--dtype", choices=sorted(DTYPES),
                    help="model and cache dtype (default: float32 on the CPU, the checkpoint's on a GPU)")
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


def engine_config(args: argparse.Namespace) -> dict[str, Any]:
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


def read_prompts(args: argparse.Namespace) -> list[list[int] | str]:
    prompts: list[list[int] | str] = list(args.prompts)  # --prompt / --prompt-ids in command-line order
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
        for line in path.read_text().splitlines():
            if line.strip():
                prompts.append([int(t) for t in line.split(",") if t.strip()] if ID_LIST.match(line) else line)
    return prompts


def zoo_tokenizer(source: Any) -> Any:
    """The byte-level tokenizer for a zoo model instance (they have none of their own), else None:
    a checkpoint directory brings its own tokenizer, if it has one."""
    import torch

    from autodeploy.models.tokenizer import byte_tokenizer

    if isinstance(source, torch.nn.Module) and getattr(getattr(source, "config", None), "vocab_size", None) == 256:
        return byte_tokenizer(source.config)
    return None

