"""Command line: ``autodeploy`` / ``python -m autodeploy``."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autodeploy", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log each transform")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the embedded demo (default)")
    from autodeploy.models import zoo_names

    run.add_argument("--model", default=None, choices=zoo_names(), help="zoo model to run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # their "falling back to torch" notices are expected here
    except ImportError:
        pass
    from autodeploy.demo import DEFAULT_MODEL, run_demo

    ok = run_demo(getattr(args, "model", None) or DEFAULT_MODEL)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
