"""``torch.compile(model, backend="autodeploy")``: autodeploy's op matching as a dynamo backend.

For every subgraph dynamo captures, the backend

1. traces it to a pre-dispatch aten graph (``make_fx(pre_dispatch=True)`` under dynamo's fake
   mode, node metadata preserved): the IR ``match_attention`` is written for, with SDPA,
   ``matmul`` and ``softmax`` still whole;
2. runs attention matching on it, so SDPA and eager matmul/softmax attention become
   ``autodeploy::attention`` (masks are probed as in ``match_attention``, see :class:`_DynamoMaskProbe`
   for dynamic shapes and for masks that read graph inputs);
3. swaps every canonical op for the fastest *uncached* implementation available: attention ->
   ``F.scaled_dot_product_attention`` (causal, or with an explicit sliding-window mask; GQA via
   ``enable_gqa``), the op's torch reference where SDPA cannot express it (soft-cap, sinks);
   ``ssd_scan`` / ``causal_conv1d`` -> autodeploy's Triton kernels on CUDA (run as one-shot cached
   calls on scratch state), the torch references otherwise;
4. hands the graph to inductor (option ``inductor``, default on) or runs it as is.

Mamba2 mixers: dynamo traces transformers' torch fallback (no mamba_ssm), i.e. inlined aten ops
that nothing matches. :func:`prepare` routes the model's Mamba2 kernel entry points into
``autodeploy::ssd_scan`` / ``causal_conv1d`` while it runs (``export.route_mamba_entry_points``,
entered around every call, outside the compiled frame), so dynamo captures the canonical ops.

Every compiled subgraph is logged (logger ``autodeploy.dynamo``) and recorded in :data:`STATS`;
several subgraphs for one forward mean graph breaks (``torch._dynamo.explain`` names them).

Options (``torch.compile(..., options={...})``): ``inductor`` (bool, default True; on the CPU a
failing inductor compile falls back to eager with a warning unless ``inductor=True`` was given),
``match_attention`` (bool, default True), ``ssm_backend`` ("auto" | "torch" | "triton" |
"flashinfer", the last meaning the Triton kernels here; see ``autodeploy.backends``),
``probe_length`` (int, default 4096: masks of dynamic-length graphs are probed at the larger of it
and the current length rounded up to a power of two; a guard ``seq_len <= that length``
recompiles beyond it),
``inductor_config`` (dict of inductor config patches).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

import autodeploy.custom_ops  # noqa: F401  (registers the canonical ops)
from autodeploy import backends
from autodeploy.custom_ops.attention import attention_reference, causal_mask
from autodeploy.custom_ops.causal_conv1d import ACTIVATIONS, causal_conv1d_reference
from autodeploy.export import MAMBA_ROUTES, hub_kernel_name, route_mamba_entry_points, ssm_mixers
from autodeploy.fx_utils import ancestors, subgraph_module
from autodeploy.transforms.match_attention import (
    MaskProbe,
    MatchAttention,
    UnmatchedAttention,
    _val,
)

logger = logging.getLogger("autodeploy.dynamo")
aten = torch.ops.aten

BACKEND_NAME = "autodeploy"
ATTENTION = torch.ops.autodeploy.attention.default
SSD_SCAN = torch.ops.autodeploy.ssd_scan.default
CAUSAL_CONV1D = torch.ops.autodeploy.causal_conv1d.default
CANONICAL = {ATTENTION: "attention", SSD_SCAN: "ssd_scan", CAUSAL_CONV1D: "causal_conv1d"}

DEFAULT_OPTIONS: dict[str, Any] = {
    "inductor": None,  # None: on, falling back to eager (with a warning) if inductor fails
    "match_attention": True,
    "ssm_backend": "auto",
    "probe_length": 4096,
    "inductor_config": None,
}

__all__ = ["autodeploy_backend", "prepare", "unprepare", "STATS", "GraphRecord", "DEFAULT_OPTIONS"]


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


@dataclass
class GraphRecord:
    """What the backend did to one dynamo subgraph."""

    index: int
    num_nodes: int  # call_function nodes of the aten graph, before matching
    matched: collections.Counter = field(default_factory=collections.Counter)  # canonical op -> count
    implementations: collections.Counter = field(default_factory=collections.Counter)  # impl -> count
    unmatched: list[str] = field(default_factory=list)  # attention left as traced, with the reason
    windows: list[int] = field(default_factory=list)  # per matched attention: sliding window (0 = full)
    soft_caps: list[float] = field(default_factory=list)  # per matched attention: logit soft-cap (0 = off)
    unrouted_ssm: int = 0  # Mamba2 mixers traced through transformers' torch fallback
    dynamic: bool = False  # the graph has symbolic sizes
    inductor: bool = False

    def summary(self) -> str:
        ops = ", ".join(f"{name} x{n}" for name, n in sorted(self.matched.items())) or "none"
        impls = ", ".join(f"{name} x{n}" for name, n in sorted(self.implementations.items()))
        text = (f"graph {self.index}: {self.num_nodes} aten nodes{' (dynamic shapes)' if self.dynamic else ''}; "
                f"matched: {ops}{f' -> {impls}' if impls else ''}; "
                f"{'inductor' if self.inductor else 'eager'}")
        if self.unmatched:
            text += f"; {len(self.unmatched)} attention(s) left unmatched"
        if self.unrouted_ssm:
            text += (f"; {self.unrouted_ssm} Mamba2 mixer(s) traced through the torch fallback "
                     "(compile the module autodeploy.dynamo_backend.prepare(model) returns to match them)")
        return text


class Stats:
    """Counters over every subgraph this backend compiled since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.graphs: list[GraphRecord] = []

    def reset(self) -> None:
        self.graphs.clear()

    @property
    def num_graphs(self) -> int:
        return len(self.graphs)

    @property
    def matched(self) -> collections.Counter:
        return sum((g.matched for g in self.graphs), collections.Counter())

    @property
    def implementations(self) -> collections.Counter:
        return sum((g.implementations for g in self.graphs), collections.Counter())

    @property
    def unmatched(self) -> list[str]:
        return [line for g in self.graphs for line in g.unmatched]

    def __repr__(self) -> str:
        return (f"Stats(graphs={self.num_graphs}, matched={dict(self.matched)}, "
                f"implementations={dict(self.implementations)}, unmatched={len(self.unmatched)})")


STATS = Stats()


# ----------------------------------------------------------------------------------------------
# Fast uncached implementations of the canonical ops
# ----------------------------------------------------------------------------------------------


def sdpa_attention(q, k, v, scale: float, sliding_window: int = 0, soft_cap: float = 0.0, sinks=None,
                   attention_chunk: int = 0):
    """``autodeploy::attention`` through ``F.scaled_dot_product_attention`` (no soft-cap, no sinks).

    q: [b, sq, hq, d]; k, v: [b, skv, hkv, d]; queries aligned to the end of the keys.
    """
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    sq, skv = q.shape[1], k.shape[1]
    gqa = q.shape[2] != k.shape[2]
    if sliding_window > 0 or attention_chunk > 0 or sq != skv:
        mask = causal_mask(sq, skv, sliding_window, attention_chunk, q.device)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def torch_ssd_scan(x, dt, A, B, C, D, dt_bias, initial_state, dt_softplus, dt_min, dt_max, chunk_size):
    """``autodeploy::ssd_scan`` (its torch reference) on a contiguous ``x``: the op's fake kernel
    gives y x's strides while the reference returns it contiguous, a mismatch inductor rejects."""
    return torch.ops.autodeploy.ssd_scan(x.contiguous(), dt, A, B, C, D, dt_bias, initial_state, dt_softplus,
                                         dt_min, dt_max, chunk_size)


def _one_shot_lanes(b: int, s, device) -> dict[str, torch.Tensor]:
    """Cached-op metadata for b fresh sequences of s tokens each, one lane (and slot) per row."""
    return dict(
        slots=torch.arange(b, dtype=torch.int32, device=device),
        cu_seqlens=torch.arange(b + 1, dtype=torch.int64, device=device) * s,
        replay_lens=torch.zeros(b, dtype=torch.int64, device=device),
        is_verify=torch.zeros(b, dtype=torch.bool, device=device),
    )


def triton_ssd_scan(x, dt, A, B, C, D, dt_bias, initial_state, dt_softplus, dt_min, dt_max, chunk_size):
    """``autodeploy::ssd_scan`` on autodeploy's Triton kernel: one lane per batch row, the final
    states written into a scratch state cache."""
    from autodeploy.custom_ops.triton_ssd_scan import triton_cached_ssd_scan  # noqa: F401  (registers)

    b, s, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if initial_state is not None:
        state = initial_state.float().clone()
    else:
        state = x.new_zeros((b, h, p, n), dtype=torch.float32)
    lanes = _one_shot_lanes(b, s, x.device)
    has_state = torch.full((b,), initial_state is not None, dtype=torch.bool, device=x.device)
    y = torch.ops.autodeploy.triton_cached_ssd_scan(
        x.reshape(1, b * s, h, p), dt.reshape(1, b * s, h), A, B.reshape(1, b * s, g, n),
        C.reshape(1, b * s, g, n), D, dt_bias, state, None, None, None, lanes["slots"],
        lanes["cu_seqlens"], has_state, lanes["replay_lens"], lanes["is_verify"], dt_softplus,
        dt_min, dt_max, chunk_size,
    )
    return y.reshape(b, s, h, p), state


def triton_causal_conv1d(x, weight, bias, activation: str):
    """``autodeploy::causal_conv1d`` on autodeploy's Triton kernel (silu or no activation)."""
    from autodeploy.custom_ops.triton_causal_conv1d import triton_cached_causal_conv1d  # noqa: F401

    b, c, s = x.shape
    k = weight.shape[1]
    tokens = x.transpose(0, 1).reshape(1, c, b * s)  # lane-major token columns
    conv_state = x.new_zeros((b, c, k - 1))
    lanes = _one_shot_lanes(b, s, x.device)
    out = torch.ops.autodeploy.triton_cached_causal_conv1d(
        tokens, weight, bias, activation, conv_state, None, lanes["slots"], lanes["cu_seqlens"],
        torch.zeros(b, dtype=torch.bool, device=x.device), lanes["replay_lens"], lanes["is_verify"],
    )
    return out.reshape(c, b, s).transpose(0, 1)


def check_single_sequence_positions(position_ids: torch.Tensor) -> None:
    """Runtime guard of a matched mask that was read off ``position_ids``: transformers builds a
    packed-sequence (block-diagonal) mask when positions restart inside a row; the matched causal
    attention does not, so such inputs must fail loudly instead of giving wrong logits."""
    steps = torch.diff(position_ids, dim=-1)
    torch._assert_async(
        torch.all(steps == 1),
        "autodeploy backend: position_ids are not one contiguous run per row (packed sequences?); "
        "the matched causal attention assumes one sequence per row. Compile with "
        "options={'match_attention': False} for packed inputs.",
    )


# ----------------------------------------------------------------------------------------------
# Mask probing on dynamo graphs
# ----------------------------------------------------------------------------------------------

# ops that read only a tensor's metadata (shape, dtype, device), never its values
METADATA_ONLY = {
    aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default,
    aten.new_ones.default, aten.new_zeros.default, aten.new_empty.default, aten.new_full.default,
    aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
}


_PROBE_ELEMENTS = 1 << 26  # at most this many mask elements are evaluated per probe


def _is_position_input(node: Node) -> bool:
    return "position" in node.meta.get("autodeploy_input", str(node.target))


class _DynamoMaskProbe(MaskProbe):
    """``MaskProbe`` for dynamo graphs.

    * Length: a static graph's masks are probed at their own (only) size, where the result is
      exact. A dynamic-length mask is probed at ``max(probe_length, current length rounded up to a
      power of two)`` and a guard ``seq_len <= that length`` is installed, so a longer input
      recompiles instead of meeting a window that the probe could not see.
    * Inputs: symbolic sizes are substituted (the mask's own sizes -> the probe length, others ->
      their current value); position inputs are fed ``arange``, other tensors zeros, as in
      ``MaskProbe``. A mask that reads the *values* of a graph input other than positions (a
      padding mask, token ids) is not matched: its input could change it at run time. One that
      reads positions (transformers' packed-sequence detection) is matched under a runtime check
      that positions are one contiguous run per row (:func:`check_single_sequence_positions`).
    """

    def __init__(self, gm: GraphModule, probe_length: int, shape_env):
        super().__init__(gm, probe_length)
        self.probe_length = probe_length
        self.shape_env = shape_env
        self.subst: dict = {}
        self.position_inputs: set[Node] = set()
        self.guards: list[tuple[torch.SymInt, int]] = []  # (symbolic size, bound it was probed up to)

    def kind(self, mask: Node, additive: bool) -> tuple[int, int]:
        key = (mask, additive)
        if key not in self.cache:
            val = _val(mask)
            if not isinstance(val, torch.Tensor) or val.dim() < 2:
                raise UnmatchedAttention("mask without shape metadata")
            self._check_inputs(mask)
            self._choose_length(mask, val)
            self.cache[key] = self._classify(self._evaluate(mask), additive)
        return self.cache[key]

    def _choose_length(self, mask: Node, val: torch.Tensor) -> None:
        dims = list(val.shape[-2:])
        symbolic = [d for d in dims if isinstance(d, torch.SymInt)]
        if not symbolic:
            self.length, self.subst = int(dims[-1]), {}
            return
        # the sequence symbols: the mask's own sizes, and the length of the position inputs it
        # reads (dynamo gives position_ids a symbol of its own, equal at run time)
        seq = {s for d in symbolic for s in d.node.expr.free_symbols}
        for p in ancestors(mask):
            pval = _val(p)
            if p.op == "placeholder" and _is_position_input(p) and isinstance(pval, torch.Tensor) and pval.dim():
                last = pval.shape[-1]
                if isinstance(last, torch.SymInt):
                    seq |= last.node.expr.free_symbols
        hint = max(self._hint(d) for d in dims)
        self.subst = {}
        others = 1
        for d in val.shape[:-2]:
            others *= self._concrete(d)
        budget = max(1, _PROBE_ELEMENTS // max(1, others))  # keep the probe mask small
        # probing further than asked would cost memory; probing up to a power of two past the
        # current length keeps recompiles (one per guard failure) logarithmic in the length
        self.length = max(1 << max(0, hint - 1).bit_length(), min(self.probe_length, math.isqrt(budget)))
        self.subst = {s: self.length for s in seq}
        self.guards.extend((d, self.length) for d in symbolic)

    def _hint(self, d) -> int:
        try:
            from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw as hint
        except ImportError:  # torch < 2.12
            from torch.fx.experimental.symbolic_shapes import hint_int as hint
        return int(hint(d))

    def _concrete(self, d) -> int:
        if not isinstance(d, torch.SymInt):
            return int(d)
        expr = d.node.expr
        hints = getattr(self.shape_env, "backed_var_to_val", None) or self.shape_env.var_to_val
        values = {s: self.subst.get(s, hints.get(s)) for s in expr.free_symbols}
        if any(v is None for v in values.values()):
            raise UnmatchedAttention(f"mask size {expr} has no value to probe with")
        return int(expr.xreplace(values))

    def _check_inputs(self, mask: Node) -> None:
        if mask.op == "placeholder":
            raise UnmatchedAttention("the mask is an input of this subgraph (built before a graph break?)")
        for node in ancestors(mask):
            if node.op == "placeholder" or node.target in METADATA_ONLY:
                continue
            for inp in node.all_input_nodes:
                if inp.op != "placeholder" or not isinstance(_val(inp), torch.Tensor):
                    continue
                if _is_position_input(inp):
                    self.position_inputs.add(inp)
                else:
                    name = inp.meta.get("autodeploy_input", inp.target)
                    raise UnmatchedAttention(
                        f"the mask reads the values of graph input {name!r} (a padding mask?); "
                        "only masks that depend on positions and sizes are matched")

    def _evaluate(self, mask: Node) -> torch.Tensor:
        sub, placeholders = subgraph_module(self.gm, mask)
        args = []
        for p in placeholders:
            val = p.meta.get("val")
            if isinstance(val, torch.SymInt):
                args.append(self._concrete(val))
            elif isinstance(val, torch.Tensor):
                shape = [self._concrete(d) for d in val.shape]
                if _is_position_input(p) and len(shape) >= 1:
                    ramp = torch.arange(shape[-1], device=val.device).to(val.dtype)
                    args.append(ramp.expand(shape).contiguous())
                else:
                    args.append(torch.zeros(shape, dtype=val.dtype, device=val.device))
            else:
                args.append(val)
        try:
            with torch.no_grad():
                return sub(*args)
        except UnmatchedAttention:
            raise
        except Exception as why:  # a subgraph that cannot run on probe inputs is not a plain mask
            raise UnmatchedAttention(f"mask could not be evaluated on a probe: {type(why).__name__}: {why}") from why


def _match_attention(gm: GraphModule, record: GraphRecord, probe_length: int, shape_env) -> _DynamoMaskProbe:
    """MatchAttention's replacements with :class:`_DynamoMaskProbe`."""
    probe = _DynamoMaskProbe(gm, probe_length, shape_env)
    _, unmatched = MatchAttention().replace_all(gm, probe)
    record.unmatched.extend(unmatched)
    return probe


# ----------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------


def _options(options: dict | None, extra: dict) -> dict[str, Any]:
    given = {**(options or {}), **extra}
    unknown = sorted(set(given) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(f"autodeploy backend: unknown option(s) {unknown}; known: {sorted(DEFAULT_OPTIONS)}")
    return {**DEFAULT_OPTIONS, **given}


def _fake_inputs(gm: GraphModule, example_inputs: Sequence[Any]):
    """Fake versions of dynamo's example inputs (with its symbolic sizes), and their fake mode."""
    from torch._guards import TracingContext, detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:  # called outside dynamo: static shapes
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    context = TracingContext.try_get()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = []
    for i, x in enumerate(example_inputs):
        if isinstance(x, FakeTensor):
            fakes.append(x if x.fake_mode is fake_mode else fake_mode.from_tensor(x))
        elif isinstance(x, torch.Tensor):
            symbolic = context.tensor_to_context.get(x) if context is not None else None
            fakes.append(fake_mode.from_tensor(
                x, symbolic_context=symbolic, source=symbolic.tensor_source if symbolic else None, trace=False))
        elif isinstance(x, int) and i < len(placeholders):
            fakes.append(placeholders[i].meta.get("example_value", x))
        else:
            fakes.append(x)
    return fake_mode, fakes


def _to_aten(gm: GraphModule, fake_mode, fake_inputs: list) -> GraphModule:
    """Pre-dispatch aten graph of a dynamo graph, node metadata (module stack) preserved."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch.fx import traceback as fx_traceback
    from torch.fx.experimental.proxy_tensor import make_fx

    def run(*args):
        with fx_traceback.preserve_node_meta():
            return torch.fx.Interpreter(gm).run(*args)

    with fake_mode, enable_python_dispatcher(), torch.no_grad():
        agm = make_fx(run, pre_dispatch=True, record_module_stack=True)(*fake_inputs)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    for node, name in zip((n for n in agm.graph.nodes if n.op == "placeholder"), names):
        node.meta["autodeploy_input"] = name
    return agm


def _count_unrouted_ssm(gm: GraphModule) -> int:
    """Mamba2 mixers whose parameters entered the graph but whose scan is not a canonical op."""
    a_logs = sum(1 for n in gm.graph.nodes
                 if n.op == "placeholder" and n.meta.get("autodeploy_input", "").lower().endswith("a_log_"))
    scans = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == SSD_SCAN)
    return max(0, a_logs - scans)


def _device_and_dtype(node: Node) -> tuple[str, str | None]:
    """Device and dtype name of the op's first input (backends are resolved for both)."""
    val = _val(node.args[0]) if node.args and isinstance(node.args[0], Node) else None
    if not isinstance(val, torch.Tensor):
        return "cpu", None
    return str(val.device), str(val.dtype).removeprefix("torch.")


def _lower(gm: GraphModule, record: GraphRecord, ssm_backend: str) -> None:
    """Swap each canonical op for its fastest uncached implementation (see module docstring)."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in CANONICAL:
            continue
        if node.target == ATTENTION:
            window = node.args[4] if len(node.args) > 4 else node.kwargs.get("sliding_window", 0)
            soft_cap = node.args[5] if len(node.args) > 5 else node.kwargs.get("soft_cap", 0.0)
            sinks = node.args[6] if len(node.args) > 6 else node.kwargs.get("sinks")
            record.windows.append(int(window))
            record.soft_caps.append(float(soft_cap))
            if soft_cap or sinks is not None:
                node.target, impl = attention_reference, "attention_reference"
            else:
                node.target, impl = sdpa_attention, "sdpa"
        else:
            family = CANONICAL[node.target]
            backend = backends.resolve(family, ssm_backend, *_device_and_dtype(node))
            if backend == "flashinfer":  # it has no uncached Mamba2 ops; its SSM backend's prefill lanes
                backend = "triton"       # run the Triton scan and conv, so those kernels serve here
            if node.target == CAUSAL_CONV1D:
                activation = node.args[3] if len(node.args) > 3 else node.kwargs.get("activation", "")
                if backend == "triton" and ACTIVATIONS.get(activation, 0) in (None, F.silu):
                    node.target, impl = triton_causal_conv1d, "triton_causal_conv1d"
                else:
                    node.target, impl = causal_conv1d_reference, "causal_conv1d_reference"
            elif backend == "triton":
                node.target, impl = triton_ssd_scan, "triton_ssd_scan"
            else:
                node.target, impl = torch_ssd_scan, "ssd_scan_reference"
        record.implementations[impl] += 1


def _insert_position_checks(gm: GraphModule, positions: set[Node]) -> None:
    for pos in positions:
        anchor = pos
        while anchor.next.op == "placeholder":
            anchor = anchor.next
        with gm.graph.inserting_after(anchor):
            gm.graph.call_function(check_single_sequence_positions, (pos,))


def autodeploy_backend(gm: GraphModule, example_inputs: list, options: dict | None = None,
                       mode: str | None = None, **kwargs) -> Callable:
    """The ``"autodeploy"`` torch.compile backend (inference): see the module docstring."""
    opts = _options(options, kwargs)
    fake_mode, fakes = _fake_inputs(gm, example_inputs)
    agm = _to_aten(gm, fake_mode, fakes)
    record = GraphRecord(
        index=len(STATS.graphs),
        num_nodes=sum(n.op == "call_function" for n in agm.graph.nodes),
        dynamic=any(isinstance(x, torch.SymInt) for x in fakes)
        or any(isinstance(d, torch.SymInt) for x in fakes if isinstance(x, torch.Tensor) for d in x.shape),
    )
    if opts["match_attention"]:
        probe = _match_attention(agm, record, int(opts["probe_length"]), fake_mode.shape_env)
        agm.graph.eliminate_dead_code()
        for size, bound in probe.guards:
            if not bool(size <= bound):  # installs the guard; holds for the current input
                raise AssertionError(f"probe bound {bound} below the current size {size}")
        if probe.position_inputs and any(n.target == ATTENTION for n in agm.graph.nodes):
            _insert_position_checks(agm, probe.position_inputs)
        for line in record.unmatched:
            logger.warning("autodeploy backend: attention left unmatched, runs as traced: %s", line)
    for node in agm.graph.nodes:
        if node.op == "call_function" and node.target in CANONICAL:
            record.matched[CANONICAL[node.target]] += 1
    record.unrouted_ssm = _count_unrouted_ssm(agm)
    _lower(agm, record, opts["ssm_backend"])
    agm.graph.lint()
    agm.recompile()

    compiled: Callable = agm
    if opts["inductor"] is not False:
        try:
            compiled = _inductor(agm, example_inputs, mode, opts["inductor_config"])
            record.inductor = True
        except Exception as why:
            if opts["inductor"]:
                raise
            logger.warning("autodeploy backend: inductor failed (%s: %s); running the graph eagerly",
                           type(why).__name__, why)
    STATS.graphs.append(record)
    logger.info("autodeploy backend: %s", record.summary())
    return compiled


def _inductor(gm: GraphModule, example_inputs: list, mode: str | None, config: dict | None) -> Callable:
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = {**(list_mode_options(mode) if mode else {}), **(config or {})}
    return compile_fx(gm, example_inputs, config_patches=patches)


# ----------------------------------------------------------------------------------------------
# Mamba2 routing for dynamo
# ----------------------------------------------------------------------------------------------

_UNCACHED_ROUTES = {"mamba_chunk_scan_combined", "causal_conv1d_fn", "mamba_split_conv1d_scan_combined"}


def _cached_entry_points(model: torch.nn.Module) -> list[tuple[Any, str, Any]]:
    """The decode-time entry points (``causal_conv1d_update``, ``selective_state_update``) of the
    modeling modules of ``model``'s mixers: kept on their torch path, so generate() still decodes."""
    keep = []
    for name in {type(m).__module__ for m in ssm_mixers(model).values()}:
        module = sys.modules.get(name)
        for attr, value in list(vars(module).items()) if module is not None else ():
            kernel = hub_kernel_name(value)
            if kernel in MAMBA_ROUTES and kernel not in _UNCACHED_ROUTES:
                keep.append((module, attr, value))
    return keep


@contextlib.contextmanager
def _routed(keep: list[tuple[Any, str, Any]]) -> Iterator[None]:
    with route_mamba_entry_points():
        for module, attr, value in keep:
            setattr(module, attr, value)
        yield


def prepare(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model``'s Mamba2 mixers call ``autodeploy::ssd_scan`` / ``causal_conv1d`` (returns it).

    Compile the module (``torch.compile(prepare(model), backend="autodeploy")``, or prepare after
    ``model.forward = torch.compile(model.forward, ...)``), not the prepared ``model.forward``
    itself: dynamo would trace the routing instead of running it. Every call of the model
    (compiled or not) then runs inside ``export.route_mamba_entry_points``, entered outside the
    compiled frame: dynamo captures the canonical ops, its guards on the patched entry points hold
    on every call, and the patches are undone when the call returns. The eager model runs the ops'
    torch references. Decode-time entry points keep their torch path. A model without Mamba2
    mixers is returned unchanged. :func:`unprepare` undoes it.
    """
    if not ssm_mixers(model) or "_autodeploy_original_forward" in vars(model):
        return model
    original = model.forward
    had_own = "forward" in vars(model)  # an instance-level forward (e.g. accelerate's hooks)
    keep = _cached_entry_points(model)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if torch.compiler.is_compiling():
            # only when this very function was handed to torch.compile (torch.compile(model.forward)
            # after prepare), which makes dynamo trace it: the mixers then stay on their torch path
            return original(*args, **kwargs)
        with _routed(keep):
            return original(*args, **kwargs)

    # skip this frame only: dynamo still compiles the model's forward called inside it
    model.forward = torch._dynamo.disable(forward, recursive=False)
    model._autodeploy_original_forward = (original, had_own)
    return model


def unprepare(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`prepare`."""
    if "_autodeploy_original_forward" in vars(model):
        original, had_own = model._autodeploy_original_forward
        del model._autodeploy_original_forward
        if had_own:
            model.forward = original
        else:
            del model.forward
    return model


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


def register() -> None:
    """Register ``"autodeploy"`` with dynamo, unless dynamo knows it already (registered, or found
    through the ``torch_dynamo_backends`` entry point, which dynamo loads and registers itself:
    registering here too would make that a duplicate)."""
    from importlib.metadata import EntryPoint

    from torch._dynamo.backends import registry

    if BACKEND_NAME in registry._COMPILER_FNS or isinstance(registry._BACKENDS.get(BACKEND_NAME), EntryPoint):
        return
    registry.register_backend(autodeploy_backend, name=BACKEND_NAME)


register()
