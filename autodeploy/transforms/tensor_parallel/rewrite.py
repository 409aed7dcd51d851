"""shard_tensor_parallel's rewrite of a solved region: head-count checks, parameters sliced,
hard-coded sizes rewritten, the all-reduce after the row linear, shapes re-propagated."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import autodeploy.custom_ops.all_reduce  # noqa: F401  (registers autodeploy::all_reduce)
from autodeploy.fx_utils import owning_module
from autodeploy.transforms.tensor_parallel.regions import (
    ALL_REDUCE,
    ATTENTION,
    CONV,
    LINEAR,
    SPLITS,
    SSD_SCAN,
    VIEWS,
    Own,
    Region,
    ShardingError,
    _is_elementwise,
    _is_tensor,
    _norm,
    _shape,
    _Unsupported,
    _val,
    aten,
)
from autodeploy.transforms.tensor_parallel.solver import _dim_maps

# op -> (argument holding the split heads, its name; argument holding the heads that may instead be
# replicated when fewer than the ranks, its name, what the error adds)
_HEAD_ARGS = {
    ATTENTION: (0, "attention heads", 1, "key/value heads", " (then each rank would keep a copy of its KV head)"),
    SSD_SCAN: (0, "SSM heads", 3, "SSM groups", ""),
}


def _check_heads(region: Region, ws: int) -> None:
    """Clear errors for head counts that cannot be split, before any layout is propagated."""
    for n in region.nodes:
        if n.target not in _HEAD_ARGS:
            continue
        where = owning_module(n) or region.name
        split_arg, split_name, shared_arg, shared_name, note = _HEAD_ARGS[n.target]
        heads, shared = _shape(n.args[split_arg])[2], _shape(n.args[shared_arg])[2]
        if heads % ws:
            raise ShardingError(f"{where}: {heads} {split_name} do not divide by tensor_parallel_size {ws}")
        if shared % ws and ws % shared:
            raise ShardingError(f"{where}: {shared} {shared_name} neither divide by tensor_parallel_size {ws} "
                                f"nor divide it{note}")


class _ParamSlicer:
    """Plans slices of parameters (and buffers) along one dim, checking that nothing outside the
    region reads them; ``commit`` applies a region's plan only once the whole region is planned."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.done: dict[str, tuple[int, tuple[int, ...]]] = {}
        self.getattrs: dict[str, list[Node]] = defaultdict(list)
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                self.getattrs[n.target].append(n)

    def want_input(self, plan: dict, node: Node, dim: int, idx: tuple[int, ...], allowed: set[Node],
                   where: str) -> None:
        """Plan the slice of the parameter behind ``node`` (a get_attr, or a chain of element-wise
        ops and (un)squeezes over one) that makes ``node`` come out sliced along ``dim``."""
        chain = []
        while node.op != "get_attr":
            tensors = [a for a in node.all_input_nodes if _is_tensor(a)]
            if node.op != "call_function" or not tensors:
                raise _Unsupported(f"{where} reads {node.name}, a full-size tensor that is not a parameter")
            src = node.args[0]
            if node.target in (aten.squeeze.dim, aten.unsqueeze.default, aten.squeeze.dims):
                _, back = _dim_maps(node)
                dim = back[dim]
            elif not (_is_elementwise(node.target) and len(tensors) == 1 and _shape(src) == _shape(node)):
                raise _Unsupported(f"{where} reads {node.name} ({node.target}) computed from a parameter")
            chain.append(node)
            node = src
        for n in [node, *chain]:
            if any(u not in allowed and u not in chain for u in n.users):
                raise _Unsupported(f"{n.name} is also read outside {where}")
        self.want(plan, node.target, dim, idx, where)

    def want(self, plan: dict, target: str, dim: int, idx: tuple[int, ...], where: str) -> None:
        prev = self.done.get(target) or plan.get(target)
        if prev is not None:
            if prev != (dim, idx):
                raise _Unsupported(f"{target} is needed in two different slices ({where})")
            return
        if len(self.getattrs[target]) > 1:
            raise _Unsupported(f"{target} is read in several places (tied weights) at {where}")
        plan[target] = (dim, idx)

    def commit(self, plan: dict) -> None:
        for target, (dim, idx) in plan.items():
            prefix, _, leaf = target.rpartition(".")
            owner = self.gm.get_submodule(prefix) if prefix else self.gm
            value = getattr(owner, leaf)
            sliced = value.detach().index_select(dim, torch.tensor(idx, device=value.device)).contiguous()
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(sliced, requires_grad=False)
            elif leaf in owner._buffers:
                owner._buffers[leaf] = sliced
            else:
                setattr(owner, leaf, sliced)
        self.done.update(plan)


def _external_slices(region: Region, own: dict[Node, Own]):
    """(input, dim, idx, consumer) for every non-region tensor a region op reads along its
    sharded dim: parameters to slice."""
    inside = region.nodes | set(region.columns)
    for x in region.nodes:
        t = x.target
        if t == ATTENTION and x in own:
            sinks = x.args[6] if len(x.args) > 6 else x.kwargs.get("sinks")
            if isinstance(sinks, Node):
                yield sinks, 0, own[x].idx, x
        elif t == SSD_SCAN and x in own:
            for p in x.args[2], x.args[5], x.args[6]:
                if isinstance(p, Node) and p not in inside:
                    yield p, 0, own[x].idx, x
        elif t == CONV:
            for p in x.args[1:3]:
                if isinstance(p, Node):
                    yield p, 0, own[x].idx, x
        elif _is_elementwise(t) and t != aten.type_as.default and x in own:
            k = len(_shape(x))
            for a in x.all_input_nodes:
                if a in inside or not _is_tensor(a):
                    continue
                d = own[x].dim - (k - len(_shape(a)))
                if d >= 0 and _shape(a)[d] != 1:
                    if _shape(a)[d] != _shape(x)[own[x].dim]:
                        raise _Unsupported(f"{a.name} does not line up with {x.name}")
                    yield a, d, own[x].idx, x
        elif t == aten.cat.default:
            if any(a not in inside and _is_tensor(a) for a in x.args[0]):
                raise _Unsupported(f"{x.name} concatenates a tensor from outside the region")


def _rewrite_sizes(region: Region, own: dict[Node, Own]) -> None:
    """Hard-coded sizes of the sharded dim in views and splits become the per-rank sizes."""
    for x in region.nodes:
        if x.target in VIEWS and x in own:
            shape = list(x.args[1])
            d = own[x].dim
            if len(shape) == len(_shape(x)) and isinstance(shape[d], int) and shape[d] != -1:
                shape[d] = len(own[x].idx)
                x.args = (x.args[0], shape, *x.args[2:])
        elif x.target in SPLITS and x in own:
            src = x.args[0]
            dim = _norm(x.args[2] if len(x.args) > 2 else x.kwargs.get("dim", 0), len(_shape(src)))
            if own[x].dim != dim:
                continue
            sizes = [p.shape[dim] for p in _val(x)]
            offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
            local = [sum(1 for i in own[x].idx if offsets[k] <= i < offsets[k + 1]) for k in range(len(sizes))]
            x.target = aten.split_with_sizes.default
            x.args = (src, local, dim)
            x.kwargs = {}


def _plan_region(region: Region, own: dict[Node, Own], slicer: _ParamSlicer) -> dict:
    """Every parameter slice the region needs; raises _Unsupported before anything changes."""
    plan: dict = {}
    allowed = region.nodes | set(region.columns)
    for a, dim, idx, _ in list(_external_slices(region, own)):
        slicer.want_input(plan, a, dim, idx, allowed, region.name)
    for col in region.columns:
        for p in col.args[1:3]:
            if isinstance(p, Node):
                if len(p.users) > 1:
                    raise _Unsupported(f"{p.target} is read by more than {col.name}")
                slicer.want(plan, p.target, 0, own[col].idx, region.name)
    w = region.row.args[1]
    if len(w.users) > 1:
        raise _Unsupported(f"{w.target} is read by more than {region.row.name}")
    slicer.want(plan, w.target, 1, own[region.row.args[0]].idx, region.name)
    return plan


def _insert_all_reduce(gm: GraphModule, row: Node) -> None:
    """``linear(x, W, b)`` -> ``all_reduce(linear(x, W)) + b``: partial sums summed over ranks,
    the bias added once."""
    graph = gm.graph
    bias = row.args[2] if len(row.args) > 2 else row.kwargs.get("bias")
    row.args, row.kwargs = (row.args[0], row.args[1]), {}
    with graph.inserting_after(row):
        reduced = graph.call_function(ALL_REDUCE, (row,))
    reduced.meta["nn_module_stack"] = row.meta.get("nn_module_stack")
    out = reduced
    if bias is not None:
        with graph.inserting_after(reduced):
            out = graph.call_function(aten.add.Tensor, (reduced, bias))
        out.meta["nn_module_stack"] = row.meta.get("nn_module_stack")
    row.replace_all_uses_with(out, delete_user_cb=lambda u: u is not reduced)


def _refresh_shapes(gm: GraphModule) -> None:
    """Re-run fake-tensor shape propagation: every node's ``meta["val"]`` gets per-rank shapes."""
    from torch._guards import detect_fake_mode

    inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(inputs)
    if mode is None:
        raise ValueError("shard_tensor_parallel: the graph's inputs carry no fake values (meta['val']); "
                         "run it on a graph from autodeploy.export_model")
    _FakeProp(gm, mode).propagate_dont_convert_inputs(*inputs)


class _FakeProp(FakeTensorProp):
    """FakeTensorProp with fake parameters, and linears by shape: in torch 2.11, ``aten.linear``
    on CUDA calls ``numel()`` on the symbolic token dimension of a fake input and raises."""

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return self._mode.from_tensor(value, static_shapes=True) if isinstance(value, torch.Tensor) else value

    def call_function(self, target, args, kwargs):
        if target == LINEAR:
            x, w = args[0], args[1]
            return x.new_empty((*x.shape[:-1], w.shape[0]))
        return super().call_function(target, args, kwargs)
