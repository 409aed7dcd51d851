"""match_rope: transformers' rotary embedding of q and k -> one ``autodeploy::rope`` per layer.

Per tensor the pattern is ``x * c + cat(-x[..., h:], x[..., :h]) * s`` (rotate_half), where c and
s are computed from ``position_ids`` alone (cos/sin of the model's rotary module, unsqueezed), and
for partial rotary ``x`` is ``q[..., :rd]`` and the result is concatenated with ``q[..., rd:]``.
The q and k matches that feed the same attention op with the same c/s become one op::

    q, k = autodeploy.rope(q, k, position_ids, cos_table, sin_table, token_dim)

The tables are the model's own c and s evaluated once for every position 0 .. max_positions-1 (so
rope scaling, per-layer bases and dtype casts are whatever the model computes) and registered as
buffers; the per-step cos/sin ops disappear from the graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from autodeploy.fx_utils import attr_value, is_op
from autodeploy.graph_record import graph_record
from autodeploy.transforms.base import Transform, TransformConfig, TransformInfo

aten = torch.ops.aten
ATTENTION = torch.ops.autodeploy.attention.default
ROPE = torch.ops.autodeploy.rope.default
_PASS_THROUGH = {aten.transpose.int, aten.view.default, aten.reshape.default, aten.to.dtype,
                 aten.contiguous.default, aten.clone.default, aten.alias.default, aten._to_copy.default}


@dataclass
class MatchRopeConfig(TransformConfig):
    max_positions: int | None = None  # table rows (default: the export's max_seq_len)


def _last_dim(node: Node, dim) -> bool:
    return dim in (-1, node.meta["val"].dim() - 1)


@dataclass
class _Rope:
    x: Node  # the tensor rotated (q or k, whole or its leading rotary channels)
    source: Node  # q or k itself
    cos: Node
    sin: Node
    end: Node  # the node whose value the op replaces


def _rotate_half_of(node) -> Node | None:
    """x if node is cat([-x[..., h:], x[..., :h]], -1)."""
    dim = node.args[1] if len(node.args) > 1 else 0
    if not (is_op(node, aten.cat.default) and len(node.args[0]) == 2 and _last_dim(node, dim)):
        return None
    neg, low = node.args[0]
    if not (is_op(neg, aten.neg.default) and is_op(neg.args[0], aten.slice.Tensor) and is_op(low, aten.slice.Tensor)):
        return None
    high = neg.args[0]
    x = low.args[0]
    if high.args[0] is not x or not (_last_dim(x, low.args[1]) and _last_dim(x, high.args[1])):
        return None
    half = x.meta["val"].shape[-1] // 2
    if tuple(low.args[2:4]) != (0, half) or high.args[2] != half:
        return None
    return x


def _match(add: Node) -> _Rope | None:
    if not (is_op(add, aten.add.Tensor) and all(is_op(a, aten.mul.Tensor) for a in add.args[:2])):
        return None
    for m_cos, m_sin in (add.args[:2], add.args[1::-1]):
        for x, c in (m_cos.args[:2], m_cos.args[1::-1]):
            for rot, s in (m_sin.args[:2], m_sin.args[1::-1]):
                if isinstance(x, Node) and _rotate_half_of(rot) is x:
                    source, end = x, add
                    # partial rotary: x = q[..., :rd], out = cat([add, q[..., rd:]])
                    if is_op(x, aten.slice.Tensor) and x.args[2] == 0 and len(add.users) == 1:
                        cat = next(iter(add.users))
                        q = x.args[0]
                        rd = x.meta["val"].shape[-1]
                        if (is_op(cat, aten.cat.default) and len(cat.args[0]) == 2 and cat.args[0][0] is add
                                and is_op(cat.args[0][1], aten.slice.Tensor) and cat.args[0][1].args[0] is q
                                and cat.args[0][1].args[2] == rd):
                            source, end = q, cat
                    return _Rope(x, source, c, s, end)
    return None


def _attention_slot(node: Node) -> tuple[Node, int] | None:
    """(attention node, 0 for q / 1 for k) that ``node`` flows into through layout-only ops."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if is_op(user, ATTENTION):
            index = user.args.index(node)
            return (user, index) if index in (0, 1) else None
        if not is_op(user, *_PASS_THROUGH):
            return None
        node = user
    return None


def _position_only(node: Node, position_ids: Node) -> bool:
    """node depends on position_ids and constants only."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and n is not position_ids:
            return False
        stack += n.all_input_nodes
    return position_ids in seen


def _evaluate(gm: GraphModule, node: Node, position_ids: Node, positions: torch.Tensor) -> torch.Tensor:
    """Value of ``node`` (a function of position_ids alone) for the given position ids."""
    env: dict[Node, object] = {position_ids: positions}

    def value(n: Node):
        if n in env:
            return env[n]
        args = torch.fx.node.map_arg(n.args, value)
        kwargs = torch.fx.node.map_arg(n.kwargs, value)
        if n.op == "get_attr":
            out = attr_value(gm, n.target)
        elif n.op == "call_function":
            out = n.target(*args, **kwargs)
        else:
            raise ValueError(f"cannot evaluate {n.op} node {n.name}")
        env[n] = out
        return out

    return value(node)


class MatchRope(Transform):
    name = "match_rope"
    Config = MatchRopeConfig

    def apply(self, gm: GraphModule, info: TransformInfo) -> None:
        graph = gm.graph
        position_ids = next((n for n in graph.nodes if n.op == "placeholder" and n.target == "position_ids"), None)
        if position_ids is None:
            return
        length = self.config.max_positions or graph_record(gm).max_seq_len
        if not isinstance(length, int) or length <= 0:
            raise ValueError(f"{self.name}: max_positions must be a positive int (or export metadata must give "
                             f"max_seq_len), got {length!r}")
        by_layer: dict[Node, dict[int, _Rope]] = {}
        unmatched = 0
        for add in [n for n in graph.nodes if is_op(n, aten.add.Tensor)]:
            m = _match(add)
            if m is None:
                continue
            slot = _attention_slot(m.end)
            if (slot is None or not _position_only(m.cos, position_ids) or not _position_only(m.sin, position_ids)):
                unmatched += 1
                continue
            by_layer.setdefault(slot[0], {})[slot[1]] = m
        tables: dict[tuple[Node, Node], tuple[str, str, int]] = {}
        for pair in by_layer.values():
            if set(pair) != {0, 1} or (pair[0].cos, pair[0].sin) != (pair[1].cos, pair[1].sin):
                unmatched += len(pair)
                continue
            q, k = pair[0], pair[1]
            key = (q.cos, q.sin)
            if key not in tables:
                tables[key] = self._tables(gm, q, position_ids, length)
            cos_name, sin_name, token_dim = tables[key]
            last = max(q.end, k.end, key=lambda n: list(graph.nodes).index(n))
            with graph.inserting_before(last):
                cos_node, sin_node = graph.get_attr(cos_name), graph.get_attr(sin_name)
                both = graph.call_function(ROPE, (q.source, k.source, position_ids, cos_node, sin_node, token_dim))
                outs = [graph.call_function(operator.getitem, (both, i)) for i in (0, 1)]
            for old, new in zip((q.end, k.end), outs):
                new.meta.update({k_: v for k_, v in old.meta.items() if k_ in ("val", "nn_module_stack")})
                old.replace_all_uses_with(new)
            info.num_matches += 1
        if info.num_matches:
            info.changed = True
            graph.eliminate_dead_code()
        info.details["tables"] = len({names for names in tables.values()})
        info.details["unmatched"] = unmatched

    @staticmethod
    def _tables(gm: GraphModule, m: _Rope, position_ids: Node, length: int) -> tuple[str, str, int]:
        """Evaluate the match's c and s for every position into [length, rd] buffers; layers whose
        tables come out identical share one pair."""
        c_val, x_val = m.cos.meta["val"], m.x.meta["val"]
        token_dims = [d for d, size in enumerate(c_val.shape) if not isinstance(size, int)]
        others = [size for d, size in enumerate(c_val.shape[:-1]) if d not in token_dims]
        if len(token_dims) != 1 or any(size != 1 for size in others):
            raise ValueError(f"match_rope: cos/sin {m.cos.name} of shape {tuple(c_val.shape)} is not one row per "
                             "token broadcast over heads")
        token_dim = token_dims[0] + x_val.dim() - c_val.dim()  # in q's dims (cos broadcasts from the right)
        with torch.no_grad():
            positions = torch.arange(length, device=position_ids.meta["val"].device)[None]
            pair = [_evaluate(gm, node, position_ids, positions).movedim(token_dim, 0).reshape(length, -1).contiguous()
                    for node in (m.cos, m.sin)]
        existing = sorted(name for name, _ in gm.named_buffers() if name.startswith("rope_cos_"))
        for cos_name in existing:
            sin_name = cos_name.replace("rope_cos_", "rope_sin_")
            if torch.equal(gm.get_buffer(cos_name), pair[0]) and torch.equal(gm.get_buffer(sin_name), pair[1]):
                return cos_name, sin_name, token_dim
        index = len(existing)
        gm.register_buffer(f"rope_cos_{index}", pair[0])
        gm.register_buffer(f"rope_sin_{index}", pair[1])
        return f"rope_cos_{index}", f"rope_sin_{index}", token_dim
