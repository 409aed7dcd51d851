"""Attention matching on dynamo graphs: match_attention's mask probe, with the graph's symbolic
sequence length bound to probe lengths."""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

import autodeploy.custom_ops  # noqa: F401  (registers the canonical ops)
from autodeploy.dynamo_backend.records import GraphRecord, aten
from autodeploy.fx_utils import ancestors, subgraph_module
from autodeploy.transforms.match_attention import MaskProbe, MatchAttention, UnmatchedAttention, _val

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
