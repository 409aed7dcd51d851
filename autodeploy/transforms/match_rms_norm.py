"""match_rms_norm: the RMSNorm subgraphs transformers writes out -> ``autodeploy::rms_norm``.

Anchored at each ``rsqrt``, the pattern is::

    xf = to(x, float32)                 [xf = to(x) * silu(to(gate))   gated, Mamba2 mixers]
    xg = view(xf, [..., groups, size])  [grouped norms only]
    y  = xf * rsqrt(mean(xf ** 2, -1, keepdim) + eps)
    y  = view(y, [..., channels])       [grouped norms only]
    out = weight * to(y, x.dtype)                        Llama, Mistral, Mamba2  (cast_first)
        | to(to(weight, float32) * y, dtype)             NemotronH
        | type_as(y * (to(weight, float32) + 1), x)      Gemma                   (weight_offset = 1)

and becomes ``rms_norm(x, weight, gate, eps, group_size, weight_offset, cast_first, out_dtype)``.
With ``fuse_residual`` a norm whose input is a residual add ``a + b`` that the stream also uses
becomes ``fused_add_rms_norm(a, b, ...)`` returning (normed, sum). Anything that deviates from the
pattern is left alone and counted in ``details["unmatched_rsqrt"]``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from autodeploy.fx_utils import is_op
from autodeploy.transforms.base import Transform, TransformConfig, TransformInfo

aten = torch.ops.aten
RMS_NORM = torch.ops.autodeploy.rms_norm.default
FUSED_ADD_RMS_NORM = torch.ops.autodeploy.fused_add_rms_norm.default


@dataclass
class MatchRMSNormConfig(TransformConfig):
    fuse_residual: bool = True


def _to_float(node) -> bool:
    return is_op(node, aten.to.dtype) and node.args[1] == torch.float32


def _val(node: Node) -> torch.Tensor:
    return node.meta["val"]


def _only_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _other(mul: Node, operand: Node):
    a, b = mul.args[:2]
    return b if a is operand else a if b is operand else None


def _weight(node) -> tuple[Node, float] | None:
    """A weight expression: (weight param, offset) for w, to(w, f32), to(w, f32) + c, w + c."""
    offset = 0.0
    if is_op(node, aten.add.Tensor) and isinstance(node.args[1], (int, float)):
        node, offset = node.args[0], float(node.args[1])
    if _to_float(node):
        node = node.args[0]
    if isinstance(node, Node) and node.op == "get_attr":
        return node, offset
    return None


@dataclass
class _Match:
    x: Node  # the norm's input (before its float32 cast)
    gate: Node | None
    weight: Node
    eps: float
    group_size: int
    weight_offset: float
    cast_first: bool
    end: Node  # the node whose value the op replaces


def _match(rsqrt: Node) -> _Match | None:
    add = rsqrt.args[0]
    if not (is_op(add, aten.add.Tensor) and isinstance(add.args[1], (int, float)) and len(add.users) == 1):
        return None
    mean = add.args[0]
    if not (is_op(mean, aten.mean.dim) and list(mean.args[1]) in ([-1], [_val(mean.args[0]).dim() - 1])
            and (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False))):
        return None
    power = mean.args[0]
    if not (is_op(power, aten.pow.Tensor_Scalar) and power.args[1] == 2):
        return None
    normed = power.args[0]  # the tensor being normalised (maybe a grouped view)
    y = _only_user(rsqrt)
    if not (is_op(y, aten.mul.Tensor) and _other(y, rsqrt) is normed):
        return None
    group_size, pre = 0, normed
    if is_op(normed, aten.view.default, aten.reshape.default):
        pre = normed.args[0]
        if _val(normed).shape[-1] == _val(pre).shape[-1]:
            return None
        group_size = int(_val(normed).shape[-1])
        nxt = _only_user(y)
        if not (is_op(nxt, aten.view.default, aten.reshape.default) and _val(nxt).shape == _val(pre).shape):
            return None
        y = nxt
    # input side: to(x, f32), or to(x, f32) * silu(to(gate, f32))
    gate = None
    if is_op(pre, aten.mul.Tensor):
        a, b = pre.args[:2]
        act = b if is_op(b, aten.silu.default) else a if is_op(a, aten.silu.default) else None
        if act is None:
            return None
        xs, gate = (a if act is b else b), act.args[0]
        gate = gate.args[0] if _to_float(gate) else gate
        pre = xs
    if not _to_float(pre):
        return None
    x = pre.args[0]
    # output side
    nxt = _only_user(y)
    if is_op(nxt, aten.to.dtype) and nxt.args[1] == _val(x).dtype:  # weight * y.to(x.dtype)
        mul = _only_user(nxt)
        w = _weight(_other(mul, nxt)) if is_op(mul, aten.mul.Tensor) else None
        if w is None or w[1] != 0.0:
            return None
        weight, offset, cast_first, end = w[0], 0.0, True, mul
    elif is_op(nxt, aten.mul.Tensor):  # y * weight-expression (float32), then a cast
        w = _weight(_other(nxt, y))
        if w is None:
            return None
        weight, offset, cast_first, end = w[0], w[1], False, nxt
    else:
        return None
    after = _only_user(end)
    if is_op(after, aten.to.dtype, aten.type_as.default) and after.args[0] is end:
        end = after
    w_val = weight.meta.get("val")
    if w_val is None or w_val.dim() != 1 or w_val.shape[0] != _val(x).shape[-1]:
        return None  # the op (and its kernel) takes one weight per channel of the last dim
    return _Match(x, gate, weight, float(add.args[1]), group_size, offset, cast_first, end)


def _absorb_upcast(graph, x: Node, cast_first: bool) -> tuple[Node, bool]:
    """The norm's input and cast_first, with an exact upcast before it absorbed.

    NemotronH's mixer casts its bf16 scan output to float32 (then reshapes it) before the gated
    norm: a cast kernel per layer per step. The op upcasts by itself, so it can read the narrow
    tensor (reshaped first: views commute with casts). Eager's cast back to x's dtype was a no-op
    (float32) there, so the op must not round to the narrow type: it multiplies weight and y in
    float32 instead (cast_first False), which is what eager's type promotion computed."""
    view = x if is_op(x, aten.view.default, aten.reshape.default) else None
    cast = view.args[0] if view is not None else x
    if not (_to_float(cast) and _val(cast.args[0]).dtype in (torch.bfloat16, torch.float16)):
        return x, cast_first
    narrow = cast.args[0]
    if view is not None:
        narrow = graph.call_function(aten.reshape.default, (narrow, *view.args[1:]))
        narrow.meta["val"] = _val(view).to(_val(cast.args[0]).dtype)
    return narrow, False


def _no_op_cast(node) -> bool:
    """``to(t, t.dtype)``: transformers casts the residual stream to the norm weight's dtype."""
    return (is_op(node, aten.to.dtype) and isinstance(node.args[0], Node)
            and _val(node.args[0]).dtype == node.args[1])


def _residual_add(x: Node) -> Node | None:
    """x (maybe through float32 casts) is ``a + b`` of two same-shaped activations."""
    node = x
    while _to_float(node) or _no_op_cast(node):
        node = node.args[0]
    if (is_op(node, aten.add.Tensor) and all(isinstance(a, Node) for a in node.args[:2])
            and _val(node.args[0]).shape == _val(node.args[1]).shape == _val(node).shape):
        return node
    return None


def _erase_dead(node: Node) -> None:
    """Erase ``node`` and the inputs only it used (the matched pattern), without a full DCE."""
    stack = [node]
    while stack:
        n = stack.pop()
        if getattr(n, "_erased", False) or n.users or n.op != "call_function":
            continue
        inputs = n.all_input_nodes
        n.graph.erase_node(n)
        stack += inputs


def _stream_continues(add: Node, x: Node) -> bool:
    """The residual sum is read by more than the norm (the next residual add): fusing saves a pass.
    A final norm, the sum's only reader, stays a plain norm so gather_logits can cut before it."""
    node = x
    while node is not add:
        if len(node.users) > 1:
            return True
        node = node.args[0]
    return len(add.users) > 1


class MatchRMSNorm(Transform):
    name = "match_rms_norm"
    Config = MatchRMSNormConfig

    def apply(self, gm: GraphModule, info: TransformInfo) -> None:
        graph = gm.graph
        unmatched, fused = 0, 0
        for rsqrt in [n for n in graph.nodes if is_op(n, aten.rsqrt.default)]:
            m = _match(rsqrt)
            if m is None:
                unmatched += 1
                continue
            out_dtype = _val(m.end).dtype
            with graph.inserting_before(m.end):
                x, cast_first = _absorb_upcast(graph, m.x, m.cast_first)
                new = graph.call_function(RMS_NORM, (x, m.weight, m.gate, m.eps, m.group_size, m.weight_offset,
                                                     cast_first, out_dtype))
            new.meta.update({k: v for k, v in m.end.meta.items() if k in ("val", "nn_module_stack")})
            m.end.replace_all_uses_with(new)
            _erase_dead(m.end)
            info.num_matches += 1
            add = _residual_add(m.x) if self.config.fuse_residual and m.gate is None and not m.group_size else None
            if add is not None and _val(m.x).dtype == _val(add).dtype and _stream_continues(add, m.x):
                self._fuse_residual(graph, add, new)
                fused += 1
        if info.num_matches:
            info.changed = True
            graph.eliminate_dead_code()
        info.details["fused_residual"] = fused
        info.details["unmatched_rsqrt"] = unmatched

    @staticmethod
    def _fuse_residual(graph, add: Node, norm: Node) -> None:
        """norm = rms_norm(add(a, b)) -> fused_add_rms_norm(a, b) giving (normed, sum)."""
        _, weight, _, eps, _, offset, cast_first, out_dtype = norm.args
        with graph.inserting_after(add):  # every reader of the sum comes after it
            both = graph.call_function(FUSED_ADD_RMS_NORM, (*add.args[:2], weight, eps, offset, cast_first, out_dtype))
        with graph.inserting_after(both):
            total = graph.call_function(operator.getitem, (both, 1))
        with graph.inserting_after(total):
            normed = graph.call_function(operator.getitem, (both, 0))
        total.meta.update({k: v for k, v in add.meta.items() if k in ("val", "nn_module_stack")})
        normed.meta.update(norm.meta)
        norm.replace_all_uses_with(normed)
        _erase_dead(norm)
        add.replace_all_uses_with(total, delete_user_cb=lambda user: user is not both)
        _erase_dead(add)

