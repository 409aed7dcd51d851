"""The files of ``autodeploy graph``: pictures before and after the transforms, an HTML page and
the summary (:func:`write_views`)."""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any

from autodeploy.graph_view.summary import summarize
from autodeploy.graph_view.svg import render_svg
from autodeploy.graph_view.view import _fmt_bytes, graph_view


def _model_name(model: Any) -> str:
    cls = type(model).__name__
    return re.sub(r"ForCausalLM$", "", cls).lower() or "model"


def write_views(model_or_llm: Any, out_dir: str | os.PathLike = "graphs", name: str | None = None,
                **config: Any) -> list[Path]:
    """Write the layer views of a model before and after the transforms, and the summary.

    ``model_or_llm``: an :class:`autodeploy.LLM`, a model (transformers or any causal LM), a zoo
    name or a checkpoint directory; ``config``: LLM options when one has to be built (default
    ``DeployConfig``'s). Writes ``<name>_before.svg``, ``<name>_after.svg``, ``<name>.html`` (both
    pictures and the summary in one page) and ``<name>_summary.txt`` under ``out_dir``; returns
    their paths. ``name`` defaults to the zoo name, the directory's name or the model class."""
    return _write_views(model_or_llm, out_dir, name, **config)[0]


def _write_views(model_or_llm: Any, out_dir: str | os.PathLike = "graphs", name: str | None = None,
                 **config: Any) -> tuple[list[Path], str]:
    """write_views, also returning the summary text."""
    from autodeploy.api import LLM
    from autodeploy.demo import load_model
    from autodeploy.export import export_model

    if isinstance(model_or_llm, LLM):
        if config:
            raise TypeError(f"LLM options {sorted(config)} are for building one; this LLM is already built")
        llm = model_or_llm
    else:
        source, loaded_name = load_model(model_or_llm)
        name = name or (loaded_name if isinstance(model_or_llm, (str, os.PathLike)) else None)
        llm = LLM(source, **config)
    name = name or _model_name(llm.model)
    before = export_model(llm.model, max_seq_len=llm.config.max_seq_len)
    sizes = llm.engine.pools.sizes
    label = f"{name} ({type(llm.model).__name__})"
    pipeline = " -> ".join(i.name for i in llm.transform_infos)
    before_view = graph_view(before, title=f"{label}: exported graph, before the transforms")
    counts = before_view.op_counts()
    before_sub = ["canonical ops: " + (", ".join(f"{k} x{v}" for k, v in counts.items()) or "none"),
                  f"next: {pipeline}"]
    after_view = graph_view(llm.gm, sizes, title=f"{label}: after {pipeline}")
    backends = ", ".join(f"{k}={v}" for k, v in after_view.backends.items())
    pools = after_view.pool_bytes()
    after_sub = [f"backends: {backends}; graph inputs: {', '.join(after_view.inputs)}",
                 f"caches for max_batch_size={sizes.max_batch_size}, max_seq_len={sizes.max_seq_len}, "
                 f"page_size={sizes.page_size}, max_num_tokens={sizes.max_num_tokens}: "
                 + ", ".join(f"{p} {_fmt_bytes(b)}" for p, b in pools.items())
                 + f" (total {_fmt_bytes(sum(pools.values()))})"]
    summary = f"model: {label}\n" + summarize(llm, before=before)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}_before.svg", out / f"{name}_after.svg", out / f"{name}.html", out / f"{name}_summary.txt"]
    svgs = [render_svg(before_view, before_sub), render_svg(after_view, after_sub)]
    paths[0].write_text(svgs[0])
    paths[1].write_text(svgs[1])
    page = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">',
            f"<title>autodeploy graph: {html.escape(label)}</title>",
            "<style>body{font-family:sans-serif;margin:20px} pre{background:#f7f7f7;padding:10px}</style>",
            "</head><body>", f"<h1>{html.escape(label)}</h1>", f"<pre>{html.escape(summary)}</pre>",
            "<h2>Before the transforms</h2>", svgs[0], "<h2>After the transforms</h2>", svgs[1], "</body></html>"]
    paths[2].write_text("\n".join(page) + "\n")
    paths[3].write_text(summary + "\n")
    return paths, summary
