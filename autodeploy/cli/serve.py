"""``autodeploy serve``: the OpenAI-compatible HTTP server on one engine."""

from __future__ import annotations

import argparse

from autodeploy.cli.options import EXIT_OK, engine_config, zoo_tokenizer


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
    llm = LLM(source, tokenizer=zoo_tokenizer(source), **engine_config(args))
    serve(llm, args.served_model_name or model, args.host, args.port, args.shutdown_timeout,
          log_level="info" if getattr(args, "verbose", False) else "warning")
    return EXIT_OK

