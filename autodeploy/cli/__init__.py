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

import contextlib
import logging
import os
import sys

from autodeploy.cli.bench import cmd_bench
from autodeploy.cli.graph import cmd_graph
from autodeploy.cli.info import cmd_info, gather_info
from autodeploy.cli.options import (
    BACKEND_CHOICES,
    COMMANDS,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    build_parser,
    logger,
    positive_int,
    speculative,
    token_ids,
)
from autodeploy.cli.run import cmd_run
from autodeploy.cli.serve import cmd_serve

__all__ = ["main", "build_parser", "gather_info", "speculative", "token_ids", "positive_int", "COMMANDS",
           "BACKEND_CHOICES"]


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
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

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

