"""Export a causal LM to an FX graph of canonical ops.

``export_model`` runs ``torch.export`` (non-strict, dynamic token dimension) on a thin wrapper
``(input_ids [1, s], position_ids [1, s]) -> logits [1, s, vocab]`` under two export-time patches,
both undone afterwards:

* **Mamba2 kernel entry points.** transformers defines ``causal_conv1d_fn``, the chunked scan and
  friends once per modeling file, each wrapped by ``use_kernel_func_from_hub_with_fallback`` with
  a hub kernel name in its closure. Every loaded modeling module's entry points are routed *by
  that kernel name* into ``autodeploy::ssd_scan`` / ``autodeploy::causal_conv1d``, so model
  families nobody here has tried are routed too. A mixer left unrouted is an error naming it.
* **Attention interface.** transformers models call ``ALL_ATTENTION_FUNCTIONS[impl]`` with the
  window, soft-cap, scale and sinks as arguments; ``impl="autodeploy"`` routes that call to
  ``autodeploy::attention``. Plain modules that call SDPA or matmul/softmax themselves are left to
  the ``match_attention`` transform.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.fx import GraphModule

import autodeploy.custom_ops  # noqa: F401  (registers the ops)
from autodeploy.calling_convention import CallingConventionError, ForwardCall
from autodeploy.fx_utils import owning_module, placeholder_names
from autodeploy.graph_record import RECORD_KEY, ExportInfo, GraphRecord, graph_record
from autodeploy.hf_version import check_transformers_version

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "autodeploy"
SSD_SCAN = torch.ops.autodeploy.ssd_scan.default
CAUSAL_CONV1D = torch.ops.autodeploy.causal_conv1d.default


class ExportError(RuntimeError):
    """The model could not be exported into canonical ops; the message names the module."""


class LogitsOnly(nn.Module):
    """``(input_ids, position_ids) -> logits``: the calling convention of every exported graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # attribute name = fx_utils.EXPORT_ROOT
        try:
            self.call = ForwardCall(model)  # what the forward accepts: calling_convention.py
        except CallingConventionError as e:
            raise ExportError(str(e)) from None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        try:
            return self.call(self.model, input_ids, position_ids)
        except CallingConventionError as e:
            raise ExportError(str(e)) from None


# ----------------------------------------------------------------------------------------------
# Mamba2 entry points, routed by hub kernel name
# ----------------------------------------------------------------------------------------------


def _chunk_scan(
    hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
    dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, **kwargs,
):
    _reject_packed(kwargs, "mamba_chunk_scan_combined")
    y, state = torch.ops.autodeploy.ssd_scan(
        hidden_states, dt, A, B, C, D, dt_bias, initial_states, bool(dt_softplus),
        float(dt_limit[0]), float(dt_limit[1]), int(chunk_size),
    )
    y = y.float()  # transformers' torch path returns float32
    return (y, state) if return_final_states else y


def _conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
    _reject_packed(kwargs, "causal_conv1d_fn")
    return torch.ops.autodeploy.causal_conv1d(hidden_states, weight, bias, activation or "")


def _split_conv1d_scan(*args, **kwargs):
    return None  # the fused training kernel: returning None makes the mixer take the unfused path


def _cached_entry_point(name: str) -> Callable:
    def refuse(*args, **kwargs):
        raise ExportError(
            f"{name} (a cached-decode kernel) was called during export; export runs with "
            "use_cache=False, so the model's mixer must not take its cache path"
        )

    return refuse


def _reject_packed(kwargs: dict, name: str) -> None:
    if kwargs.get("seq_idx") is not None or kwargs.get("cu_seqlens") is not None:
        raise ExportError(f"{name}: packed sequences (seq_idx/cu_seqlens) are not supported at export")


MAMBA_ROUTES: dict[str, Callable] = {
    "mamba_chunk_scan_combined": _chunk_scan,
    "causal_conv1d_fn": _conv1d_fn,
    "mamba_split_conv1d_scan_combined": _split_conv1d_scan,
    "causal_conv1d_update": _cached_entry_point("causal_conv1d_update"),
    "selective_state_update": _cached_entry_point("selective_state_update"),
}


def hub_kernel_name(fn: Any) -> str | None:
    """The hub kernel name a transformers entry point was decorated with, or None."""
    if not inspect.isfunction(fn) or fn.__closure__ is None:
        return None
    try:
        name = inspect.getclosurevars(fn).nonlocals.get("func_name")
    except (TypeError, ValueError):
        return None
    return name if isinstance(name, str) else None


@contextlib.contextmanager
def route_mamba_entry_points() -> Iterator[list[str]]:
    """Patch every loaded transformers modeling module's Mamba2 entry points; undo on exit.

    Yields the names of the patched modules.
    """
    patched: list[tuple[Any, str, Any]] = []
    modules: list[str] = []
    for mod_name, module in list(sys.modules.items()):
        if module is None or not mod_name.startswith("transformers.models.") or ".modeling_" not in mod_name:
            continue
        hit = False
        for attr, value in list(vars(module).items()):
            kernel = hub_kernel_name(value)
            if kernel in MAMBA_ROUTES:
                patched.append((module, attr, value))
                setattr(module, attr, MAMBA_ROUTES[kernel])
                hit = True
        if hit:
            modules.append(mod_name)
    try:
        yield modules
    finally:
        for module, attr, value in reversed(patched):
            setattr(module, attr, value)


# ----------------------------------------------------------------------------------------------
# Attention interface
# ----------------------------------------------------------------------------------------------


class _AttentionCounter:
    calls = 0


def _hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                  sliding_window=None, softcap=None, **kwargs):
    """transformers attention interface -> ``autodeploy::attention`` ([b, h, s, d] in, [b, s, h, d] out)."""
    if attention_mask is not None:
        raise ExportError(f"{type(module).__name__}: unexpected explicit attention mask at export")
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    if sliding_window is None:
        # Models that express the window only through their mask get no mask under a custom
        # interface; they keep it on the module (NemotronH-style, the attribute vLLM reads too).
        sliding_window = getattr(module, "sliding_window", None)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    _AttentionCounter.calls += 1
    chunk = _attention_chunk(module)
    out = torch.ops.autodeploy.attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), float(scale),
        int(sliding_window or 0), float(softcap or 0.0), sinks, *((chunk,) if chunk else ()),
    )
    return out, None


def _attention_chunk(module: nn.Module) -> int:
    """The block size of a block-local ("chunked_attention") layer, as Llama 4's local layers name it
    in ``config.layer_types`` (they express it only through the mask, which a custom attention
    interface does not receive); 0 for any other layer."""
    config = getattr(module, "config", None)
    layer_types, index = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    if layer_types is None or index is None or layer_types[index] != "chunked_attention":
        return 0
    chunk = getattr(config, "attention_chunk_size", None)
    if not isinstance(chunk, int) or chunk < 1:
        raise ExportError(f"{type(module).__name__} layer {index} is 'chunked_attention' but attention_chunk_size "
                          f"is {chunk!r}")
    return chunk


def _check_position_free_attention(model: nn.Module, max_seq_len: int) -> None:
    """Llama 4's no-RoPE layers scale queries by a temperature computed from ``arange(seq_len)``,
    not from ``position_ids``; it is 1 (no effect) below position ``floor_scale - 1``. A cached
    engine feeds a step's tokens at other positions, so beyond that it would be wrong: refused."""
    for name, m in model.named_modules():
        floor_scale = getattr(m, "floor_scale", None)
        if getattr(m, "attn_temperature_tuning", False) and hasattr(m, "use_rope") and not m.use_rope \
                and isinstance(floor_scale, (int, float)) and max_seq_len > floor_scale - 1:
            raise ExportError(
                f"{name} ({type(m).__name__}) scales its queries by a temperature computed from arange(seq_len) "
                f"instead of position_ids, which changes from position {int(floor_scale) - 1} (floor_scale "
                f"{floor_scale}); a cached engine cannot reproduce it there: use max_seq_len <= {int(floor_scale) - 1}")


def _all_attention_causal(model: nn.Module) -> bool:
    return all(getattr(m, "is_causal", True) for m in model.modules() if hasattr(m, "is_causal"))


@contextlib.contextmanager
def route_attention_interface(model: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Set ``config._attn_implementation = "autodeploy"`` on a transformers model; undo on exit.

    Yields whether routing is active (False for non-transformers modules and non-causal models).
    """
    config = getattr(model, "config", None)
    if (not enabled or config is None or not hasattr(config, "_attn_implementation")
            or not _all_attention_causal(model)):
        yield False
        return
    check_transformers_version()
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _hf_attention)
    previous = config._attn_implementation
    config._attn_implementation = ATTN_IMPLEMENTATION
    try:
        yield True
    finally:
        config._attn_implementation = previous


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def ssm_mixers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that look like a Mamba2 mixer (an ``A_log`` parameter next to a ``conv1d``)."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(getattr(m, "A_log", None), nn.Parameter) and hasattr(m, "conv1d")
    }


def _check_mixers_routed(model: nn.Module, gm: GraphModule) -> None:
    mixers = ssm_mixers(model)
    if not mixers:
        return
    scanned = {owning_module(n) for n in gm.graph.nodes if n.target == SSD_SCAN}
    convolved = {owning_module(n) for n in gm.graph.nodes if n.target == CAUSAL_CONV1D}
    missing = [
        name for name in mixers if name not in scanned or name not in convolved
    ]
    if missing:
        raise ExportError(
            "could not route the Mamba mixer(s) "
            + ", ".join(f"{name} ({type(mixers[name]).__name__})" for name in missing)
            + " into autodeploy::ssd_scan/causal_conv1d: its modeling file does not call the "
            "transformers hub-kernel entry points (mamba_chunk_scan_combined, causal_conv1d_fn)"
        )


def _to_plain_graph_module(gm: GraphModule) -> None:
    """Make ``gm`` a plain ``forward(input_ids, position_ids) -> logits``.

    ``ep.module()`` flattens inputs through a pytree spec and calls a ``_guards_fn`` submodule;
    transforms add graph inputs (raw batch facts, caches), which a fixed spec would reject.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    for key, hook in list(gm._forward_pre_hooks.items()):
        if "check_input_constraints" in getattr(hook, "__name__", ""):
            del gm._forward_pre_hooks[key]  # checks inputs against the fixed export spec
    graph._codegen = torch.fx.graph.CodeGen()
    output = graph.output_node()
    outs = output.args[0]
    if isinstance(outs, (tuple, list)):
        if len(outs) != 1:
            raise ExportError(f"expected the model to return logits only, got {len(outs)} outputs")
        output.args = (outs[0],)
    gm.recompile()


def _strip_metadata_asserts(gm: GraphModule) -> None:
    """Drop export's ``_assert_tensor_metadata`` guards: they are extra users that would pin dead
    intermediate tensors once transforms rewrite the graph, and they compute nothing."""
    for node in list(gm.graph.nodes):
        if node.target == torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _probe_length(model: nn.Module, max_seq_len: int) -> int:
    """Long enough to cross the model's sliding window (when its config names one that is small
    enough to probe cheaply), so a window lost in export shows up as a numeric difference."""
    config = getattr(model, "config", None)
    window = max(getattr(config, "sliding_window", None) or 0, getattr(config, "attention_chunk_size", None) or 0)
    return min(max_seq_len, 64 + (window if window <= 4096 else 0))


@torch.no_grad()
def _check_against_model(model: nn.Module, gm: GraphModule, device: torch.device) -> None:
    """Run the exported graph and the model itself (its own attention, unrouted) on the same
    seeded tokens and raise :class:`ExportError` if the logits disagree: a routing or capture
    mistake must fail at build time, not produce plausible wrong tokens."""
    length = _probe_length(model, graph_record(gm).max_seq_len)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embed, "num_embeddings", 1)
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    pos = torch.arange(length, device=device)[None]
    was_training = model.training
    model.eval()
    try:
        expected = LogitsOnly(model)(ids, pos).float()
    finally:
        model.train(was_training)
    got = gm(ids, pos).float()
    fp32 = expected.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32
    tol = (1e-3 if fp32 else 5e-2) * max(1.0, expected.abs().max().item())
    diff = (got - expected).abs().max().item()
    if not diff <= tol:
        raise ExportError(
            f"the exported graph of {type(model).__name__} disagrees with the model itself on a "
            f"{length}-token probe: max |logit difference| {diff:.3g} > {tol:.3g}; a layer was "
            "captured wrongly (attention mask or window, or an unrouted custom kernel)"
        )


def export_model(
    model: nn.Module,
    max_seq_len: int = 1024,
    example_len: int = 37,
    route_attention: bool = True,
) -> GraphModule:
    """Export ``model`` to a GraphModule ``(input_ids [1, s], position_ids [1, s]) -> logits``.

    The token dimension ``s`` is dynamic in ``[1, max_seq_len]``. Mamba2 mixers and transformers
    attention come out as canonical ``autodeploy`` ops; other attention stays as exported (SDPA
    or matmul/softmax) for ``match_attention``. Raises :class:`ExportError` naming a Mamba mixer
    that could not be routed. ``route_attention=False`` leaves transformers attention as the
    model's own implementation (SDPA or eager) for ``match_attention`` to find.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    example_len = max(2, min(example_len, max_seq_len))
    _check_position_free_attention(model, max_seq_len)
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    ids = torch.zeros(1, example_len, dtype=torch.long, device=device)
    pos = torch.arange(example_len, device=device)[None]
    seq = torch.export.Dim("seq_len", min=1, max=max_seq_len)
    _AttentionCounter.calls = 0
    try:
        with route_mamba_entry_points() as mamba_modules, route_attention_interface(model, route_attention):
            with torch.no_grad():
                ep = torch.export.export(
                    LogitsOnly(model), (ids, pos), dynamic_shapes=({1: seq}, {1: seq}), strict=False
                )
    finally:
        model.train(was_training)
    gm = ep.module()
    _to_plain_graph_module(gm)
    _strip_metadata_asserts(gm)
    gm.meta[RECORD_KEY] = GraphRecord(tuple(placeholder_names(gm)), ExportInfo(
        max_seq_len=max_seq_len,
        example_len=example_len,
        routed_attention=_AttentionCounter.calls,
        routed_mamba_modules=tuple(mamba_modules),
    ))
    _check_mixers_routed(model, gm)
    _check_against_model(model, gm, device)
    logger.info(
        "exported %s: %d nodes, %d attention calls routed", type(model).__name__,
        len(gm.graph.nodes), _AttentionCounter.calls,
    )
    return gm
