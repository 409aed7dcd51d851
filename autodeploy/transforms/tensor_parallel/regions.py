"""shard_tensor_parallel's regions: each row linear with the column linears that feed it only
through parameters, constants and position-only tensors (:func:`find_regions`), and the graph
facts the other parts share."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

import autodeploy.custom_ops.all_reduce  # noqa: F401  (registers autodeploy::all_reduce)
from autodeploy.fx_utils import owning_module

logger = logging.getLogger("autodeploy.transforms")
aten = torch.ops.aten
LINEAR = aten.linear.default
ALL_REDUCE = torch.ops.autodeploy.all_reduce.default
ATTENTION = torch.ops.autodeploy.attention.default
SSD_SCAN = torch.ops.autodeploy.ssd_scan.default
CONV = torch.ops.autodeploy.causal_conv1d.default
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
SPLITS = {aten.split_with_sizes.default, aten.split.Tensor}
REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._log_softmax.default, aten.log_softmax.int}


# element-wise ops torch does not tag as pointwise
ELEMENTWISE = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default,
               aten.alias.default, aten.detach.default, aten.contiguous.default, aten.dropout.default,
               aten.clone.default}


class ShardingError(ValueError):
    """The model cannot be split over this many ranks; the message names the module."""


class _Unsupported(Exception):
    """A region this transform does not understand: it stays replicated."""


@dataclass(frozen=True)
class Own:
    """The slice of a tensor a rank owns: indices ``idx`` (global, ascending) along ``dim``."""

    dim: int
    idx: tuple[int, ...]


def _val(n: Node):
    return n.meta.get("val")


def _shape(n: Node) -> tuple:
    return tuple(_val(n).shape)


def _is_tensor(n) -> bool:
    return isinstance(n, Node) and isinstance(_val(n), torch.Tensor)


def _carries_tensor(n: Node) -> bool:
    v = _val(n)
    return isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in v))


def _norm(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _is_weight_linear(n: Node) -> bool:
    if n.op != "call_function" or n.target != LINEAR:
        return False
    w = n.args[1]
    bias = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    return (isinstance(w, Node) and w.op == "get_attr" and _is_tensor(w) and _val(w).dim() == 2
            and (bias is None or (isinstance(bias, Node) and bias.op == "get_attr")))


def _is_elementwise(target) -> bool:
    return target in ELEMENTWISE or (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags)


def _module_of(nodes) -> str:
    """The innermost module path shared by ``nodes`` (e.g. ``model.layers.0.self_attn``)."""
    paths = [owning_module(n).split(".") for n in nodes if owning_module(n)]
    if not paths:
        return "<model>"
    common = paths[0]
    for p in paths[1:]:
        k = 0
        while k < min(len(common), len(p)) and common[k] == p[k]:
            k += 1
        common = common[:k]
    return ".".join(common) or "<model>"


@dataclass
class Region:
    columns: list[Node]  # column-parallel linears (q, k, v / gate, up / in_proj)
    row: Node  # the row-parallel linear (o_proj / down / out_proj)
    nodes: set[Node]  # every op between them
    name: str


def _activation_nodes(gm: GraphModule) -> set[Node]:
    """Tensor nodes that depend on the token ids: the hidden stream (sizes are not tensors)."""
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    act = {first}
    for n in gm.graph.nodes:
        if n not in act and _carries_tensor(n) and any(i in act for i in n.all_input_nodes):
            act.add(n)
    return act


def find_regions(gm: GraphModule) -> list[Region]:
    """Column/row-parallel regions of ``gm``, in graph order of their row linear."""
    linears = [n for n in gm.graph.nodes if _is_weight_linear(n)]
    linear_set = set(linears)
    activations = _activation_nodes(gm)
    closure: dict[Node, set[Node]] = {}
    groups: dict[Node, list[Node]] = defaultdict(list)
    for lin in linears:
        seen, ends, stack = set(), set(), [lin]
        while stack and len(ends) < 2:  # two ends: not a column linear (the residual stream runs on)
            for user in stack.pop().users:
                if user in linear_set or user.op == "output":
                    ends.add(user)
                elif user not in seen:
                    seen.add(user)
                    stack.append(user)
        closure[lin] = seen
        if len(ends) == 1:
            (end,) = ends
            if end in linear_set:
                groups[end].append(lin)
    regions = []
    for row, cols in groups.items():
        nodes = set().union(*(closure[c] for c in cols))
        inside = nodes | set(cols)
        if row.args[0] not in inside:
            continue
        # the region's ops read only the columns, each other, parameters and position-only tensors
        if any(i in activations and i not in inside for n in nodes for i in n.all_input_nodes):
            continue
        regions.append(Region(cols, row, nodes, _module_of([*cols, row])))
    return regions
