"""``autodeploy info``: versions, devices, and which backend runs each op family where."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
from typing import Any

from autodeploy.cli.options import EXIT_OK


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
        for backend in backends.BACKENDS:
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

