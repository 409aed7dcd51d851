"""The Python API, shaped like vLLM's offline API.

    llm = autodeploy.LLM(model, max_batch_size=8, max_seq_len=512)
    outs = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=32))
    outs[0].outputs[0].token_ids
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from autodeploy.export import export_model
from autodeploy.runtime.engine import Engine
from autodeploy.runtime.pools import PoolSizes, full_pages_within
from autodeploy.runtime.sampling import SamplingParams
from autodeploy.transforms.pipeline import CACHED_PIPELINE, run_pipeline

logger = logging.getLogger("autodeploy")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DeployConfig:
    """How to build and run the engine. Defaults suit the embedded demo model on a CPU.

    max_batch_size: sequences per step (lanes). max_seq_len: prompt + generated tokens per request.
    page_size: tokens per KV page. max_num_tokens: token budget per step (prefill chunk size).
    num_pages: full-attention KV pages (default: enough for max_batch_size full-length requests).
    max_cache_bytes: a memory budget for all caches instead of num_pages: the fixed caches
    (per-slot SSM/conv state, sliding-window rings) are paid first, the rest becomes full-attention
    pages.
    dtype: "float32" | "bfloat16" | "float16". device: "cpu" | "cuda". attn_backend, ssm_backend:
    cached-op backends ("torch" today). compile_mode: "eager".
    """

    max_batch_size: int = 8
    max_seq_len: int = 512
    page_size: int = 16
    max_num_tokens: int = 128
    num_pages: int | None = None
    max_cache_bytes: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    attn_backend: str = "torch"
    ssm_backend: str = "torch"
    compile_mode: str = "eager"

    def __post_init__(self):
        for name in ("max_batch_size", "max_seq_len", "page_size", "max_num_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DeployConfig.{name} must be a positive int, got {value!r}")
        for name in ("num_pages", "max_cache_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"DeployConfig.{name} must be a positive int, got {value!r}")
        if self.num_pages is not None and self.max_cache_bytes is not None:
            raise ValueError("give DeployConfig.num_pages or max_cache_bytes, not both")
        if self.dtype not in DTYPES:
            raise ValueError(f"DeployConfig.dtype {self.dtype!r} unknown; known: {sorted(DTYPES)}")
        if self.compile_mode != "eager":
            raise ValueError(f"DeployConfig.compile_mode {self.compile_mode!r} unknown; known: ['eager']")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "DeployConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown LLM option(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str | None
    finish_reason: str | None


@dataclass
class RequestOutput:
    """One prompt's result. ``prompt_index`` is its position in the ``generate``/``stream`` call."""

    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    prompt_index: int = 0


def _load(model: nn.Module | str | os.PathLike, dtype: torch.dtype):
    if isinstance(model, nn.Module):
        return model, None
    path = os.fspath(model)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} has no config.json: not a transformers checkpoint directory")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return loaded, tokenizer


def _eos_token_ids(model: nn.Module) -> set[int]:
    """Every end-of-sequence id the model's generation config (else its config) names."""
    ids: set[int] = set()
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
            break
    return ids


class LLM:
    """An inference engine for ``model`` (a transformers model instance or checkpoint directory)."""

    def __init__(self, model: nn.Module | str | os.PathLike, tokenizer: Any = None, **config: Any):
        self.config = DeployConfig.from_kwargs(**config)
        dtype = DTYPES[self.config.dtype]
        model, loaded_tokenizer = _load(model, dtype)
        self.tokenizer = tokenizer or loaded_tokenizer
        self.model = model.to(device=self.config.device, dtype=dtype).eval()
        cfg = self.config
        start = time.perf_counter()
        self.gm = export_model(self.model, max_seq_len=cfg.max_seq_len)
        self.transform_infos = run_pipeline(self.gm, CACHED_PIPELINE, {
            "insert_cached_attention": {"page_size": cfg.page_size, "max_num_tokens": cfg.max_num_tokens,
                                        "backend": cfg.attn_backend},
            "insert_cached_ssm": {"backend": cfg.ssm_backend},
        })
        self.build_seconds = time.perf_counter() - start
        sizes = PoolSizes(cfg.max_batch_size, cfg.max_seq_len, cfg.page_size, cfg.max_num_tokens, cfg.num_pages)
        if cfg.max_cache_bytes is not None:
            sizes.num_full_pages = full_pages_within(cfg.max_cache_bytes, self.gm.meta.get("autodeploy_caches", []), sizes)
        model_cfg = getattr(self.model, "config", None)
        vocab = getattr(model_cfg, "vocab_size", None) or self.gm.graph.output_node().args[0].meta["val"].shape[-1]
        self.engine = Engine(self.gm, sizes, vocab, _eos_token_ids(self.model), cfg.device)
        logger.info("cache pools: %s; %d full-attention pages of %d tokens", {
            pool: f"{b / 2**20:.1f} MiB" for pool, b in self.cache_bytes().items()}, sizes.num_full_pages, cfg.page_size)

    def cache_bytes(self) -> dict[str, int]:
        return self.engine.pools.bytes_by_pool()

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError(f"prompt dict needs 'prompt_token_ids', got keys {sorted(prompt)}")
            return list(prompt["prompt_token_ids"])
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer; pass {'prompt_token_ids': [...]} instead")
            return list(self.tokenizer(prompt)["input_ids"])
        raise TypeError(f"a prompt is a str or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns one RequestOutput per prompt, in order."""
        final: dict[int, RequestOutput] = {}
        for out in self.stream(prompts, sampling_params):
            if out.finished:
                final[out.prompt_index] = out
        return [final[i] for i in range(len(final))]

    def stream(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[RequestOutput]:
        """Serve every prompt concurrently, yielding a RequestOutput (all tokens so far) each time a
        prompt gains tokens; the last one per prompt has ``finished=True``. Every request is
        validated before any is queued; leaving the loop early aborts the unfinished ones."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        token_lists = [self._prompt_ids(p) for p in prompts]
        ids: list[int] = []
        try:
            for tokens, p in zip(token_lists, params):
                ids.append(self.engine.add_request(tokens, p))
            reported = dict.fromkeys(ids, 0)
            while reported:
                self.engine.step()
                for index, rid in enumerate(ids):
                    req = self.engine.requests.get(rid)
                    if rid not in reported or (len(req.output) == reported[rid] and not req.finished):
                        continue
                    reported[rid] = len(req.output)
                    if req.finished:
                        del reported[rid]
                        self.engine.requests.pop(rid)
                    yield self._output(req, index)
        finally:
            for rid in ids:
                if rid in self.engine.requests:
                    self.engine.abort(rid)
                    self.engine.requests.pop(rid)

    def _output(self, req, index: int) -> RequestOutput:
        text = self.tokenizer.decode(req.output) if self.tokenizer is not None else None
        return RequestOutput(req.request_id, list(req.prompt),
                             [CompletionOutput(0, list(req.output), text, req.finish_reason)], req.finished, index)
