"""``autodeploy graph``: what the transforms did, and pictures of the graph before and after."""

from __future__ import annotations

import argparse

from autodeploy.cli.options import EXIT_OK, engine_config


def cmd_graph(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from autodeploy.demo import load_model
    from autodeploy.graph_view import _write_views

    source, name = load_model(args.model)
    paths, summary = _write_views(source, args.out, name=name, **engine_config(args))
    print(summary)
    print("wrote:")
    for p in paths:
        print(f"  {p}")
    return EXIT_OK

