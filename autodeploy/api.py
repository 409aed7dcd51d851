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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from autodeploy import defaults, distributed, gguf
from autodeploy.fx_utils import move_graph_module
from autodeploy.graph_record import graph_record
from autodeploy.runtime.engine import Engine
from autodeploy.runtime.pools import PoolSizes, full_pages_within, snapshot_bytes
from autodeploy.runtime.runner import COMPILE_MODES, GraphRunner, default_capture_sizes
from autodeploy.runtime.sampling import SamplingParams
from autodeploy.runtime.speculative import Drafter, DraftModelDrafter, NgramDrafter, SpecDecodingStats
from autodeploy.self_check import self_check
from autodeploy.text import TextStream, chat_prompt_ids, text_prompt_ids
from autodeploy.transforms.pipeline import PERF_TRANSFORMS, build_cached_graph

logger = logging.getLogger("autodeploy")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DeployConfig:
    """How to build and run the engine. Options left None are chosen from the model and the device
    (autodeploy.defaults; the choices are logged in one line): on a GPU the checkpoint's dtype, CUDA
    graphs, the model's context length, 64 lanes, 2048-token steps and caches filling
    ``gpu_memory_utilization`` of the GPU; on the CPU float32, eager, 8 lanes, 128-token steps and
    the context length up to 2048.

    max_batch_size: sequences per step (lanes). max_seq_len: prompt + generated tokens per request.
    page_size: tokens per KV page. max_num_tokens: token budget per step (prefill chunk size).
    num_pages: full-attention KV pages (default: enough for max_batch_size full-length requests).
    max_cache_bytes: a memory budget for all caches instead of num_pages: the fixed caches
    (per-slot SSM/conv state, sliding-window rings) are paid first, the rest becomes full-attention
    pages. gpu_memory_utilization: on a GPU without num_pages / max_cache_bytes, the fraction of
    its memory the engine may use in all (weights, activations, caches), as in vLLM.
    dtype: "float32" | "bfloat16" | "float16". device: "cpu" | "cuda" (default: cuda when a GPU is
    visible). attn_backend, ssm_backend:
    cached-op backends, "torch" | "triton" | "flashinfer" | "auto" (the fastest available on the
    device, as measured; see autodeploy.backends). compile_mode: "eager" | "inductor" |
    "cudagraph" | "inductor+cudagraph" (AutoDeploy's torch-simple / torch-compile /
    torch-cudagraph / torch-opt are aliases).
    cuda_graph_sizes: token counts to capture (default: powers of two up to a full decode or
    verify step of every lane); steps with more tokens run uncaptured. Adding prefill sizes (e.g.
    2048) replays prefill chunks padded to the next captured size: worth it where eager prefill is
    host-bound (bench-swa-0.7b 2k: 24.9 -> 9.1 ms), not where the kernels dominate (bench-hybrid:
    21.1 -> 19.7 ms, and a padded chunk pays for its padding; benchmarks/RESULTS.md).
    checked: checked mode (default: the AUTODEPLOY_CHECKED environment variable): the graph
    asserts on the device that every index handed to a kernel is inside its pool, and the engine
    checks pool accounting after every step.
    speculative_config: speculative decoding, vLLM's keys: {"method": "ngram", "num_speculative_tokens":
    K, "prompt_lookup_max": 4, "prompt_lookup_min": 1} or {"method": "draft_model", "model": <model
    instance or checkpoint directory>, "num_speculative_tokens": K}. None: off.
    tensor_parallel_size: ranks the model is split over (shard_tensor_parallel), one process per
    rank launched by torchrun; default: torchrun's WORLD_SIZE (1 when not launched by torchrun).
    perf_transforms: switch graph rewrites off by name (all on by default): "match_rope",
    "match_rms_norm", "fuse_projections", "match_gated_activation", "fold_constants" (weight-only
    expressions computed once), "gather_logits" (LM head only on the rows whose logits are used),
    "fuse_mamba_decode" (a Triton-backend Mamba2 mixer's conv, scan and gated norm in one op),
    "match_linear" (a Triton GEMV for one-row steps on CUDA), "fuse_norm_linear" (an RMSNorm and
    the linear layer it feeds as one op), "fuse_norm_add_norm" (a norm, the residual add and the
    next norm as one op), "fuse_norm_rope" (per-head q/k norms and RoPE as one op),
    e.g. {"fuse_projections": False}.
    enable_prefix_caching: reuse the caches of earlier requests whose tokens start the prompt
    (shared system prompts, the previous turns of a chat), exactly: tokens are those without it
    (docs/prefix_caching.md). Off by default. prefix_snapshots: snapshots of per-slot state
    (SSM/conv, sliding-window keys) and partial pages kept for hits (default 4 x max_batch_size,
    at most a quarter of max_cache_bytes; their own pool, "prefix_snapshots" in cache_bytes()).
    prefix_snapshot_interval: tokens between the snapshots a prefill takes on a model with
    per-slot state (a multiple of page_size; default 256).
    self_check: before serving, run a short probe (two requests, chunked prefill, decode steps)
    through the engine and compare its logits with the model's own forward; a mismatch is an error
    naming the first module whose output differs (autodeploy/self_check.py).
    """

    max_batch_size: int | None = None
    max_seq_len: int | None = None
    page_size: int = 16
    max_num_tokens: int | None = None
    num_pages: int | None = None
    max_cache_bytes: int | None = None
    dtype: str | None = None
    device: str = field(default_factory=lambda: defaults.default_device(torch.cuda.is_available()))
    attn_backend: str = "auto"
    ssm_backend: str = "auto"
    compile_mode: str | None = None
    gpu_memory_utilization: float = 0.9
    checked: bool = field(default_factory=lambda: os.environ.get("AUTODEPLOY_CHECKED", "") not in ("", "0"))
    cuda_graph_sizes: list[int] | None = None
    speculative_config: dict | None = None
    tensor_parallel_size: int = field(default_factory=distributed.launched_world_size)
    perf_transforms: dict[str, bool] | None = None
    self_check: bool = True
    enable_prefix_caching: bool = False
    prefix_snapshots: int | None = None
    prefix_snapshot_interval: int | None = None

    def __post_init__(self):
        for name in ("page_size", "tensor_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DeployConfig.{name} must be a positive int, got {value!r}")
        for name in ("num_pages", "max_cache_bytes", "max_batch_size", "max_seq_len", "max_num_tokens",
                     "prefix_snapshot_interval"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"DeployConfig.{name} must be a positive int, got {value!r}")
        if self.num_pages is not None and self.max_cache_bytes is not None:
            raise ValueError("give DeployConfig.num_pages or max_cache_bytes, not both")
        if self.prefix_snapshots is not None and (not isinstance(self.prefix_snapshots, int)
                                                  or self.prefix_snapshots < 0):
            raise ValueError(f"DeployConfig.prefix_snapshots must be an int >= 0, got {self.prefix_snapshots!r}")
        if self.prefix_snapshot_interval is not None and self.prefix_snapshot_interval % self.page_size:
            raise ValueError(f"DeployConfig.prefix_snapshot_interval ({self.prefix_snapshot_interval}) must be a "
                             f"multiple of page_size ({self.page_size})")
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("DeployConfig.gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization!r}")
        if self.compile_mode is None:
            self.compile_mode = defaults.default_compile_mode(str(self.device), self.attn_backend, self.ssm_backend)
        if self.dtype is None and not str(self.device).startswith("cuda"):
            self.dtype = "float32"
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"DeployConfig.dtype {self.dtype!r} unknown; known: {sorted(DTYPES)}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"DeployConfig.compile_mode {self.compile_mode!r} unknown; known: {sorted(COMPILE_MODES)}")
        if "cudagraph" in COMPILE_MODES[self.compile_mode]:
            if not self.device.startswith("cuda"):
                raise ValueError(f"compile_mode {self.compile_mode!r} captures CUDA graphs: it needs device='cuda'")
            if "torch" in (self.attn_backend, self.ssm_backend):
                raise ValueError("CUDA graphs need capture-safe cached ops; the torch backend syncs with the host "
                                 "(use attn_backend/ssm_backend 'auto', 'triton' or 'flashinfer')")
        if self.perf_transforms is not None:
            unknown = sorted(set(self.perf_transforms) - set(PERF_TRANSFORMS))
            if unknown or not all(isinstance(v, bool) for v in self.perf_transforms.values()):
                raise ValueError(f"DeployConfig.perf_transforms maps transform names to bools; unknown {unknown}, "
                                 f"known: {list(PERF_TRANSFORMS)}")
        if self.speculative_config is not None:
            sizes = defaults.GPU_SIZES if str(self.device).startswith("cuda") else defaults.CPU_SIZES
            self.speculative_config = _check_speculative_config(
                self.speculative_config, self.max_num_tokens or sizes["max_num_tokens"])

    @property
    def num_speculative_tokens(self) -> int:
        return self.speculative_config["num_speculative_tokens"] if self.speculative_config else 0

    def completed(self, model: nn.Module) -> DeployConfig:
        """This config with every size left None chosen from ``model``'s config and the device
        (see autodeploy.defaults); logs the choices in one line."""
        sizes = ("max_seq_len", "max_batch_size", "max_num_tokens", "num_pages", "max_cache_bytes")
        given = {name: getattr(self, name) for name in sizes}
        facts = defaults.DeviceFacts.probe(str(self.device))
        spec_k = (self.speculative_config or {}).get("num_speculative_tokens", 0) or 0
        chosen = defaults.choose(given, facts, getattr(model, "config", None), DTYPES[self.dtype].itemsize,
                                 self.page_size, self.gpu_memory_utilization, spec_k)
        done = dataclasses.replace(self, **chosen)
        picked = {n: getattr(done, n) for n in sizes if given[n] is None and getattr(done, n) is not None}
        logger.info("engine config (%s): device=%s dtype=%s compile_mode=%s %s", facts.name, done.device, done.dtype,
                    done.compile_mode, " ".join(f"{k}={v}" for k, v in picked.items()))
        return done

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> DeployConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown LLM option(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)


SPECULATIVE_KEYS = {
    "ngram": {"method": None, "num_speculative_tokens": None, "prompt_lookup_max": 4, "prompt_lookup_min": 1},
    "draft_model": {"method": None, "num_speculative_tokens": None, "model": None},
}


def _check_speculative_config(spec: dict, max_num_tokens: int) -> dict:
    """The speculative config with defaults filled in; ValueError naming what is wrong."""
    if not isinstance(spec, dict):
        raise ValueError(f"speculative_config must be a dict, got {type(spec).__name__}")
    method = spec.get("method")
    if method not in SPECULATIVE_KEYS:
        raise ValueError(f"speculative_config method {method!r} unknown; known: {sorted(SPECULATIVE_KEYS)}")
    known = SPECULATIVE_KEYS[method]
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise ValueError(f"speculative_config keys {unknown} unknown for method {method!r}; known: {sorted(known)}")
    out = {**known, **spec}
    k = out["num_speculative_tokens"]
    if not isinstance(k, int) or not 1 <= k < max_num_tokens:
        raise ValueError(f"speculative_config num_speculative_tokens must be an int in [1, max_num_tokens "
                         f"{max_num_tokens}), got {k!r}")
    if method == "draft_model" and out["model"] is None:
        raise ValueError("speculative_config method 'draft_model' needs 'model' (a model or a checkpoint directory)")
    return out


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
    spec_stats: SpecDecodingStats | None = None  # with speculative decoding: drafts proposed/accepted
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache (vLLM's name)


def _snapshot_count(cfg: DeployConfig, specs: list, sizes: PoolSizes) -> int:
    """Prefix snapshots to keep: ``prefix_snapshots``, else 4 per lane, at most a quarter of a
    cache budget (a sliding-window model's snapshots hold W keys per layer each)."""
    if cfg.prefix_snapshots is not None:
        return cfg.prefix_snapshots
    count = 4 * cfg.max_batch_size
    if cfg.max_cache_bytes is not None:
        each = snapshot_bytes(specs, dataclasses.replace(sizes, num_snapshots=1))
        count = min(count, cfg.max_cache_bytes // 4 // max(each, 1))
    return count


def _check_device_usable(device: str) -> None:
    """A CUDA device asked for on a machine without a usable GPU is a clear error (torch itself
    raises a bare AssertionError deep inside the first tensor move)."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)")
        raise ValueError(f"device={device!r} needs a usable GPU, but {why} (torch {torch.__version__}); "
                         "use device='cpu'")


def _check_config_json(path: str) -> None:
    """config.json must be a JSON object: a corrupt one is reported as such, not as a loader error."""
    import json

    file = os.path.join(path, "config.json")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}): the checkpoint's config is corrupt") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} holds a JSON {type(config).__name__}, not an object: the checkpoint's config "
                         "is corrupt")


def _load(model: nn.Module | str | os.PathLike, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """(model, tokenizer or None) for a module, a checkpoint directory or a ``.gguf`` file; checkpoint
    weights are read straight into ``dtype`` on ``device`` (no full-precision host copy)."""
    if isinstance(model, nn.Module):
        return model, None
    path = os.fspath(model)
    if gguf.is_gguf(path):
        return gguf.load_gguf(path, dtype, device)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} has no config.json: not a transformers checkpoint directory")
    _check_config_json(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(device), local_files_only=True)
    except OSError as e:  # config.json but no (or partial) weights
        raise FileNotFoundError(f"cannot load the checkpoint in {path!r}: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return loaded, tokenizer


def _vocab_size(model: nn.Module, gm) -> int:
    return (getattr(getattr(model, "config", None), "vocab_size", None)
            or gm.graph.output_node().args[0].meta["val"].shape[-1])


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
        _check_device_usable(self.config.device)
        if self.config.tensor_parallel_size > 1:  # joins torchrun's process group; cuda -> cuda:LOCAL_RANK
            self.config.device = distributed.init(self.config.tensor_parallel_size, self.config.device)
        if self.config.dtype is None:  # on a GPU: the checkpoint's own dtype
            self.config.dtype = defaults.default_dtype(str(self.config.device), defaults.checkpoint_dtype(model))
        dtype = DTYPES[self.config.dtype]
        # a rank of a tensor-parallel GPU run builds (exports, shards) on the host and moves only its
        # shard to its GPU: the whole model never has to fit one GPU
        self._build_device = "cpu" if self.config.tensor_parallel_size > 1 and str(self.config.device) != "cpu" \
            else self.config.device
        model, loaded_tokenizer = _load(model, dtype, self._build_device)
        self.tokenizer = tokenizer or loaded_tokenizer
        self.model = model.to(device=self._build_device, dtype=dtype).eval()
        if self.config.tensor_parallel_size > 1:
            distributed.check_same_weights(self.model)
        self.config = cfg = self.config.completed(self.model)
        start = time.perf_counter()
        self.gm, self.transform_infos = self._graph(self.model)
        record = self.record = graph_record(self.gm)  # what the graph decided: the runner checks sizes against it
        sizes = PoolSizes(cfg.max_batch_size, cfg.max_seq_len, record.page_size or cfg.page_size,
                          record.max_num_tokens or cfg.max_num_tokens, cfg.num_pages)
        if cfg.enable_prefix_caching:
            sizes.num_snapshots = _snapshot_count(cfg, list(record.caches), sizes)
        if cfg.max_cache_bytes is not None:
            sizes.num_full_pages = full_pages_within(cfg.max_cache_bytes, list(record.caches), sizes)
        vocab = _vocab_size(self.model, self.gm)
        self.drafter = self._drafter(sizes, vocab, dtype)
        self.engine = Engine(self._runner(self.gm, sizes), sizes, vocab, _eos_token_ids(self.model), cfg.device,
                             self.drafter, prefix_caching=cfg.enable_prefix_caching,
                             snapshot_interval=cfg.prefix_snapshot_interval)
        self.engine.checked = cfg.checked
        if cfg.self_check:
            self._self_check(dtype)
        self.build_seconds = time.perf_counter() - start
        self.spec_stats = SpecDecodingStats() if self.drafter is not None else None
        logger.info("backends: %s", record.backends)
        self.rank = distributed.rank() if cfg.tensor_parallel_size > 1 else 0  # rank 0's outputs are authoritative
        logger.info("cache pools%s: %s; %d full-attention pages of %d tokens",
                    f" (rank {self.rank} of {cfg.tensor_parallel_size}, this rank's)" if cfg.tensor_parallel_size > 1
                    else "", {pool: f"{b / 2**20:.1f} MiB" for pool, b in self.cache_bytes().items()},
                    sizes.num_full_pages, cfg.page_size)

    def _self_check(self, dtype: torch.dtype) -> None:
        """The engine (and a draft model's) against the model's own forward: autodeploy/self_check.py."""
        if self.config.tensor_parallel_size > 1 and str(self._build_device) != str(self.config.device):
            logger.info("self-check skipped: under tensor parallelism on GPUs the unsharded reference forward "
                        "would run on the host")
            return
        plain = dataclasses.replace(self.config, perf_transforms=dict.fromkeys(PERF_TRANSFORMS, False))
        self_check(self.model, self.engine.runner, dtype, lambda: self._graph(self.model, plain)[0])
        if isinstance(self.drafter, DraftModelDrafter):
            self_check(self.draft_model, self.drafter.runner, dtype, lambda: self._graph(self.draft_model, plain)[0],
                       what="the draft model's engine")

    def _graph(self, model: nn.Module, cfg: DeployConfig | None = None):
        """The cached graph of ``model`` on the engine's device (built where the model is)."""
        gm, infos = build_cached_graph(model, cfg or self.config, distributed.rank())
        if str(self._build_device) != str(self.config.device):
            move_graph_module(gm, self.config.device)
        return gm, infos

    def _drafter(self, sizes: PoolSizes, vocab: int, dtype: torch.dtype) -> Drafter | None:
        spec, k = self.config.speculative_config, self.config.num_speculative_tokens
        if spec is None:
            return None
        if spec["method"] == "ngram":
            return NgramDrafter(k, spec["prompt_lookup_min"], spec["prompt_lookup_max"])
        draft, _ = _load(spec["model"], dtype, self._build_device)
        draft = draft.to(device=self._build_device, dtype=dtype).eval()
        self.draft_model = draft
        gm, _ = self._graph(draft)
        if _vocab_size(draft, gm) != vocab:
            raise ValueError(f"the draft model's vocabulary ({_vocab_size(draft, gm)}) differs from the target's "
                             f"({vocab})")
        return DraftModelDrafter(self._runner(gm, dataclasses.replace(sizes, num_snapshots=0)), k)

    def _runner(self, gm, sizes: PoolSizes) -> GraphRunner:
        cfg = self.config
        capture = cfg.cuda_graph_sizes or default_capture_sizes(
            cfg.max_batch_size, cfg.num_speculative_tokens, cfg.max_num_tokens)
        runner = GraphRunner(gm, sizes, cfg.device, cfg.compile_mode, capture)
        if runner.graphs:
            logger.info("captured %d CUDA graphs (token counts %s) in %.1f s", len(runner.graphs),
                        sorted(runner.graphs), runner.capture_seconds)
        return runner

    def cache_bytes(self) -> dict[str, int]:
        """Bytes per cache pool (this rank's, under tensor parallelism); a draft model's pools are
        prefixed "draft:"."""
        out = self.engine.pools.bytes_by_pool()
        if isinstance(self.drafter, DraftModelDrafter):
            out.update({f"draft:{pool}": b for pool, b in self.drafter.runner.pools.bytes_by_pool().items()})
        return out

    def _prompt_ids(self, prompt: Any) -> list[int]:
        """vLLM's prompt forms: a str, {"prompt": str}, or {"prompt_token_ids": [...]}."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if hasattr(ids, "tolist"):  # a tensor or an array of token ids
                    if getattr(ids, "ndim", 1) != 1:
                        raise ValueError(f"prompt_token_ids must be 1-D, got shape {tuple(ids.shape)}")
                    ids = ids.tolist()
                return list(ids)
            if isinstance(prompt.get("prompt"), str):
                return text_prompt_ids(self.tokenizer, prompt["prompt"])
            raise ValueError(f"prompt dict needs 'prompt_token_ids' or 'prompt' (a str), got keys {sorted(prompt)}")
        if isinstance(prompt, str):
            return text_prompt_ids(self.tokenizer, prompt)
        raise TypeError(f"a prompt is a str, {{'prompt': str}} or {{'prompt_token_ids': [...]}}, "
                        f"got {type(prompt).__name__}")

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Generate the assistant's reply to a conversation ([{"role": "user", "content": ...}, ...])
        or to each of a list of conversations, through the tokenizer's chat template (or
        ``chat_template``, a Jinja string) with the generation prompt added, as vLLM's ``LLM.chat``."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [{"prompt_token_ids": chat_prompt_ids(self.tokenizer, c, chat_template)} for c in conversations]
        return self.generate(prompts, sampling_params)

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
        many = isinstance(sampling_params, (list, tuple))
        params = list(sampling_params) if many else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        token_lists = [self._prompt_ids(p) for p in prompts]
        if self.config.tensor_parallel_size > 1:
            token_lists, params = self._same_requests_on_every_rank(token_lists, params)
        texts = [TextStream(self.tokenizer, p.stop) for p in params]  # before any request is queued
        ids: list[int] = []
        try:
            for tokens, p in zip(token_lists, params):
                ids.append(self.engine.add_request(tokens, p))
            while texts and any(t is not None for t in texts):
                self.engine.step()
                for index, rid in enumerate(ids):
                    text = texts[index]
                    req = self.engine.requests.get(rid)
                    if text is None or (len(req.output) == len(text.token_ids) and not req.finished):
                        continue
                    text.push(req.output[len(text.token_ids):])
                    reason = "stop" if text.stopped else req.finish_reason
                    if text.stopped and not req.finished:
                        self.engine.abort(rid)  # a stop string: free its caches now
                    if reason is not None:
                        text.finish()
                        texts[index] = None
                        self.engine.requests.pop(rid)
                        if self.spec_stats is not None:
                            self.spec_stats.add(req.spec)
                    yield self._output(req, index, text, reason)
        finally:
            for rid in ids:
                if rid in self.engine.requests:
                    self.engine.abort(rid)
                    self.engine.requests.pop(rid)

    def _same_requests_on_every_rank(self, token_lists: list[list[int]], params: list[SamplingParams]):
        """Rank 0's requests on every rank, sampled requests seeded by rank 0: every rank then runs
        the same schedule and, from logits that the all-reduces make identical, draws the same tokens."""
        if self.rank == 0:
            params = [dataclasses.replace(p, seed=int(torch.randint(2**62, ()).item()))
                      if p.temperature > 0 and p.seed is None else p for p in params]
        return distributed.broadcast_object((token_lists, params))

    def _output(self, req, index: int, text: TextStream, reason: str | None) -> RequestOutput:
        """A snapshot of ``req``: its tokens up to a stop string and the text released so far."""
        spec = dataclasses.replace(req.spec) if self.drafter is not None else None
        completion = CompletionOutput(0, list(text.token_ids), text.text[:text.released] if self.tokenizer else None,
                                      reason)
        return RequestOutput(req.request_id, list(req.prompt), [completion], reason is not None, index, spec,
                             req.num_cached_tokens)
