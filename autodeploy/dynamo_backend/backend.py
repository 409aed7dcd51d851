"""The ``torch.compile`` backend itself (the dynamo graph to ATen, attention matched, canonical ops
lowered to their fast uncached implementations, then inductor) and its registration with dynamo."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

import autodeploy.custom_ops  # noqa: F401  (registers the canonical ops)
from autodeploy import backends
from autodeploy.custom_ops.attention import attention_reference
from autodeploy.custom_ops.causal_conv1d import ACTIVATIONS, causal_conv1d_reference
from autodeploy.dynamo_backend.mask_probe import _match_attention
from autodeploy.dynamo_backend.ops import (
    check_single_sequence_positions,
    sdpa_attention,
    torch_ssd_scan,
    triton_causal_conv1d,
    triton_ssd_scan,
)
from autodeploy.dynamo_backend.records import (
    ATTENTION,
    BACKEND_NAME,
    CANONICAL,
    CAUSAL_CONV1D,
    DEFAULT_OPTIONS,
    SSD_SCAN,
    STATS,
    GraphRecord,
    logger,
)
from autodeploy.transforms.match_attention import _val


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


def register() -> None:
    """Register ``"autodeploy"`` with dynamo, unless dynamo knows it already (registered, or found
    through the ``torch_dynamo_backends`` entry point, which dynamo loads and registers itself:
    registering here too would make that a duplicate)."""
    from importlib.metadata import EntryPoint

    from torch._dynamo.backends import registry

    if BACKEND_NAME in registry._COMPILER_FNS or isinstance(registry._BACKENDS.get(BACKEND_NAME), EntryPoint):
        return
    registry.register_backend(autodeploy_backend, name=BACKEND_NAME)
