"""shard_tensor_parallel: split column/row-parallel linear pairs over the ranks of a TP group.

Before (an attention layer; MLPs and Mamba2 mixers alike)::

    q = linear(h, Wq); k = linear(h, Wk); v = linear(h, Wv)        # Wq [hq*d, hidden]
    o = autodeploy.attention(view(q, [1, s, -1, d]), ...)          # [1, s, hq, d]
    out = linear(reshape(o, [1, s, -1]), Wo)                       # Wo [hidden, hq*d]

After, on rank r of N::

    q = linear(h, Wq[rows of q heads r*hq/N ..]); k = ...; v = ...                 # column-parallel
    o = autodeploy.attention(...)                                                 # [1, s, hq/N, d]
    out = autodeploy.all_reduce(linear(reshape(o, [1, s, -1]), Wo[:, same cols]))  # row-parallel

**Detection is structural.** A *row* linear R and its *column* linears C: every linear whose
output reaches exactly one linear (R) and nothing else, through a region of ops whose only other
inputs are parameters, constants and position-only tensors (never the hidden stream: a residual
add ends a region). Attention q/k/v -> o_proj, MLP gate/up -> down and Mamba2 in_proj -> out_proj
come out this way, fused projections (one qkv or gate_up linear and a split) too.

**Which channels a rank owns** is solved over the region, starting from R's input (rank r owns
the r-th contiguous 1/N of it) and propagating through views (channels <-> whole heads), splits
(in_proj's [z | x B C | dt]), transposes, pointwise ops, reductions, the depthwise conv, and the
canonical ops: attention (query heads; KV heads by GQA group), ssd_scan (SSM heads; B/C groups by
head group). So a rank owns whole attention heads with their KV heads, and whole SSM heads with
their conv channels, dt, A, D, dt_bias, B/C groups and gated-norm groups. Parameters the region
reads (conv weight, A_log, norm weight, sinks) are sliced the same way; hard-coded sizes in
view/reshape/split nodes are rewritten; shapes are re-propagated, so the cache-insertion
transforms that run next see per-rank head counts and size the caches per rank.

**Head counts.** Query heads, SSM heads and the row input must divide by N; otherwise a
:class:`ShardingError` names the module. KV heads (and SSM groups) fewer than N are *replicated*
when N is a multiple of them (each rank keeps the KV head its query heads read, as vLLM does), so
those caches are not split. A region with an op this transform does not know, or whose split
would cut a unit (Mamba2 gated-norm groups fewer than N, a norm over all heads), stays whole on
every rank, with a warning naming the module: replicated compute is always correct.

Embedding and LM head stay replicated (every rank computes full logits, which the sampler needs
on every rank anyway). One all-reduce per row linear; none at all when world_size is 1.
"""

from __future__ import annotations

import logging
import math
import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import autodeploy.custom_ops.all_reduce  # noqa: F401  (registers autodeploy::all_reduce)
from autodeploy.fx_utils import owning_module
from autodeploy.transforms.base import Transform, TransformConfig, TransformInfo

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


@dataclass
class ShardTensorParallelConfig(TransformConfig):
    rank: int = 0
    world_size: int = 1


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


# ----------------------------------------------------------------------------------------------
# Finding column/row regions
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Which indices a rank owns: propagation over one region
# ----------------------------------------------------------------------------------------------


def _prod(xs) -> int:
    return math.prod(xs) if xs else 1


def _static_suffix(shape: tuple) -> int:
    """Index of the first dim of the trailing run of static sizes."""
    k = len(shape)
    while k > 0 and isinstance(shape[k - 1], int):
        k -= 1
    return k


def _view_map(src: tuple, dst: tuple, own: Own, where: str) -> Own:
    """Map ``own`` on a tensor of shape ``src`` through a view to shape ``dst``.

    The trailing static dims of both shapes hold the same elements in the same order; the owned
    elements must be exactly "every element whose index along one dst dim is in a set" (the
    outermost such dim is taken): channels -> whole heads, heads -> channels, a lone KV head."""
    a, b = _static_suffix(src), _static_suffix(dst)
    if own.dim < a or _prod(src[a:]) != _prod(dst[b:]) or src[:a] != dst[:b]:
        raise _Unsupported(f"a view at {where} that moves the sharded dim across dynamic sizes")
    s_shape, d_shape = [int(x) for x in src[a:]], [int(x) for x in dst[b:]]
    axis = torch.zeros(s_shape[own.dim - a], dtype=torch.bool)
    axis[list(own.idx)] = True
    view = [1] * len(s_shape)
    view[own.dim - a] = -1
    mask = axis.view(view).expand(s_shape).reshape(d_shape)
    for d in range(len(d_shape)):
        others = [k for k in range(len(d_shape)) if k != d]
        kept = mask.any(dim=others) if others else mask
        view = [1] * len(d_shape)
        view[d] = -1
        if torch.equal(mask, kept.view(view).expand(d_shape)):
            return Own(b + d, tuple(kept.nonzero().flatten().tolist()))
    raise _Unsupported(f"{where}: a view regroups {list(s_shape)} as {list(d_shape)}, and the split over the "
                       "ranks would cut one of its units (e.g. gated-norm groups fewer than the ranks)")


def _chunk(size: int, rank: int, world_size: int) -> tuple[int, ...]:
    step = size // world_size
    return tuple(range(rank * step, (rank + 1) * step))


def _grouped(heads: tuple[int, ...], num_heads: int, num_groups: int, where: str, what: str) -> tuple[int, ...]:
    """The groups (KV heads, SSM groups) that the owned ``heads`` read, checked to keep the
    local head -> group mapping (local head i reads local group i // (local heads per group))."""
    per_group = num_heads // num_groups
    groups = tuple(sorted({h // per_group for h in heads}))
    if len(heads) % len(groups):
        raise ShardingError(f"{where}: {len(heads)} local {what} heads do not spread over {len(groups)} groups")
    local = len(heads) // len(groups)
    for i, h in enumerate(heads):
        if groups[i // local] != h // per_group:
            raise ShardingError(f"{where}: the {what} head -> group mapping does not survive the split")
    return groups


def _dim_maps(x: Node) -> tuple[dict[int, int], dict[int, int]]:
    """Input dim -> output dim and back, for transposes, permutes and (un)squeezes."""
    n_in, n_out = len(_shape(x.args[0])), len(_shape(x))
    t = x.target
    if t in (aten.transpose.int, aten.t.default):
        perm = list(range(n_in))
        d0, d1 = (0, 1) if t == aten.t.default else (_norm(x.args[1], n_in), _norm(x.args[2], n_in))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    elif t == aten.permute.default:
        perm = [_norm(d, n_in) for d in x.args[1]]
    elif t == aten.unsqueeze.default:
        d = _norm(x.args[1], n_out)
        fwd = {k: (k if k < d else k + 1) for k in range(n_in)}
        return fwd, {v: k for k, v in fwd.items()}
    else:  # squeeze
        dims = x.args[1] if t == aten.squeeze.dims else [x.args[1]]
        gone = {_norm(d, n_in) for d in dims if _shape(x.args[0])[_norm(d, n_in)] == 1}
        kept = [k for k in range(n_in) if k not in gone]
        fwd = {k: i for i, k in enumerate(kept)}
        return fwd, {v: k for k, v in fwd.items()}
    back = {o: perm[o] for o in range(n_out)}
    return {v: k for k, v in back.items()}, back


class _Solver:
    """Assigns an :class:`Own` to every tensor of a region, from the row linear's input."""

    def __init__(self, region: Region, rank: int, world_size: int):
        self.region, self.rank, self.ws = region, rank, world_size
        self.carrying = region.nodes | set(region.columns)
        self.own: dict[Node, Own] = {}

    def assign(self, node, own: Own) -> bool:
        if not isinstance(node, Node) or node not in self.carrying:
            return False
        old = self.own.get(node)
        if old is None:
            self.own[node] = own
            return True
        if old != own:
            raise _Unsupported(f"two different layouts meet at {node.name} ({owning_module(node) or 'model'})")
        return False

    def solve(self) -> dict[Node, Own]:
        row_in = self.region.row.args[0]
        width = _shape(row_in)[-1]
        if width % self.ws:
            raise ShardingError(f"{self.region.name}: the input width {width} of {self.region.row.name} "
                                f"({owning_module(self.region.row)}) does not divide by {self.ws} ranks")
        self.assign(row_in, Own(len(_shape(row_in)) - 1, _chunk(width, self.rank, self.ws)))
        order = [n for n in self.region.row.graph.nodes if n in self.carrying]
        changed = True
        while changed:
            changed = False
            for node in order:
                changed |= self.step(node)
        missing = [n.name for n in order if _carries_tensor(n) and n not in self.own]
        if missing:
            raise _Unsupported(f"no layout reaches {', '.join(missing[:4])}")
        return self.own

    # -- one op ------------------------------------------------------------------------------------
    def step(self, x: Node) -> bool:
        if x in self.region.columns:
            return False
        t, own, ch = x.target, self.own.get(x), False
        where = f"{x.name} ({owning_module(x) or 'model'})"
        if _is_elementwise(t):
            ins = [x.args[0]] if t == aten.type_as.default else [a for a in x.all_input_nodes if a in self.carrying]
            k = len(_shape(x))
            if own is None:
                src = next((a for a in ins if a in self.own), None)
                if src is not None:
                    o = self.own[src]
                    ch |= self.assign(x, Own(o.dim + k - len(_shape(src)), o.idx))
                own = self.own.get(x)
            if own is not None:
                for a in ins:
                    d = own.dim - (k - len(_shape(a)))
                    if d < 0 or _shape(a)[d] != _shape(x)[own.dim]:
                        raise _Unsupported(f"{where} broadcasts a sharded tensor along the sharded dim")
                    ch |= self.assign(a, Own(d, own.idx))
            return ch
        if t in VIEWS:
            src = x.args[0]
            if src in self.own:
                ch |= self.assign(x, _view_map(_shape(src), _shape(x), self.own[src], where))
            if x in self.own:
                ch |= self.assign(src, _view_map(_shape(x), _shape(src), self.own[x], where))
            return ch
        if t in (aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim,
                 aten.squeeze.dims, aten.t.default):
            src = x.args[0]
            fwd, back = _dim_maps(x)
            if src in self.own:
                o = self.own[src]
                ch |= self.assign(x, Own(fwd[o.dim], o.idx))
            if x in self.own:
                o = self.own[x]
                ch |= self.assign(src, Own(back[o.dim], o.idx))
            return ch
        if t in SPLITS or t == CONV:  # the layout passes through unchanged (conv: per channel)
            src = x.args[0]
            if src in self.own:
                ch |= self.assign(x, self.own[src])
            if x in self.own:
                ch |= self.assign(src, self.own[x])
            return ch
        if t is operator.getitem:
            return self._getitem(x, where)
        if t in (aten.slice.Tensor, aten.cat.default, *SOFTMAX):
            dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", 0)
            ins = [a for a in (x.args[0] if t == aten.cat.default else [x.args[0]]) if a in self.carrying]
            for a in ins:
                if a in self.own:
                    ch |= self.assign(x, self.own[a])
            if x in self.own:
                if _norm(dim, len(_shape(x))) == self.own[x].dim:
                    raise _Unsupported(f"{where} slices, concatenates or normalises along the sharded dim")
                for a in ins:
                    ch |= self.assign(a, self.own[x])
            return ch
        if t in REDUCTIONS:
            return self._reduction(x, where)
        if t == ATTENTION:
            return self._attention(x, where)
        if t == SSD_SCAN:
            return self._ssd_scan(x, where)
        raise _Unsupported(f"{where}: {t} is not an op shard_tensor_parallel knows how to split")

    def _getitem(self, g: Node, where: str) -> bool:
        x, k = g.args
        ch = False
        if x.target == SSD_SCAN:
            dim = 2 if k == 0 else 1
            if x in self.own:
                ch |= self.assign(g, Own(dim, self.own[x].idx))
            if g in self.own:
                ch |= self.assign(x, Own(2, self.own[g].idx))
            return ch
        if x.target not in SPLITS:
            raise _Unsupported(f"{where}: getitem of {x.target}")
        src = x.args[0]
        n_src = len(_shape(src))
        dim = _norm(x.args[2] if len(x.args) > 2 else x.kwargs.get("dim", 0), n_src)
        sizes = [p.shape[dim] for p in _val(x)]
        offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        if x in self.own and self.own[x].dim != dim:
            ch |= self.assign(g, self.own[x])
        elif g in self.own and self.own[g].dim != dim:
            ch |= self.assign(x, self.own[g])
        elif x in self.own:
            lo, hi = offsets[k], offsets[k + 1]
            ch |= self.assign(g, Own(dim, tuple(i - lo for i in self.own[x].idx if lo <= i < hi)))
        else:  # all pieces known -> the split input
            pieces = {u.args[1]: u for u in x.users if u.target is operator.getitem}
            idx: list[int] = []
            for i, size in enumerate(sizes):
                piece = pieces.get(i)
                if piece is None:  # an unused piece: any equal split will do
                    if size % self.ws:
                        raise _Unsupported(f"{where}: an unused split piece of {size} does not divide by {self.ws}")
                    part = _chunk(size, self.rank, self.ws)
                elif piece in self.own:
                    part = self.own[piece].idx
                else:
                    return False
                idx += [offsets[i] + j for j in part]
            ch |= self.assign(x, Own(dim, tuple(idx)))
        return ch

    def _reduction(self, x: Node, where: str) -> bool:
        src = x.args[0]
        n_in = len(_shape(src))
        dims = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", list(range(n_in)))
        dims = {_norm(d, n_in) for d in ([dims] if isinstance(dims, int) else dims)}
        keep = bool(x.args[2] if len(x.args) > 2 else x.kwargs.get("keepdim", False))
        fwd = {k: (k if keep else k - sum(d < k for d in dims)) for k in range(n_in) if k not in dims}
        ch = False
        if src in self.own:
            if self.own[src].dim in dims:
                raise _Unsupported(f"{where} reduces over the split dim (a norm over all heads or groups)")
            ch |= self.assign(x, Own(fwd[self.own[src].dim], self.own[src].idx))
        if x in self.own:
            back = {v: k for k, v in fwd.items()}
            ch |= self.assign(src, Own(back[self.own[x].dim], self.own[x].idx))
        return ch

    def _attention(self, x: Node, where: str) -> bool:
        q, k, v = x.args[:3]
        ch = False
        if q in self.own:
            ch |= self.assign(x, self.own[q])
        if x in self.own:
            ch |= self.assign(q, self.own[x])
        if x in self.own:
            heads = self.own[x].idx
            kv = _grouped(heads, _shape(q)[2], _shape(k)[2], where, "query")
            ch |= self.assign(k, Own(2, kv)) | self.assign(v, Own(2, kv))
        return ch

    def _ssd_scan(self, x: Node, where: str) -> bool:
        xs, dt, a, b, c, d, dt_bias, init = x.args[:8]
        ch = False
        if xs in self.own:
            ch |= self.assign(x, self.own[xs])
        if x in self.own:
            heads = self.own[x].idx
            groups = _grouped(heads, _shape(xs)[2], _shape(b)[2], where, "SSM")
            ch |= self.assign(xs, Own(2, heads)) | self.assign(dt, Own(2, heads))
            ch |= self.assign(b, Own(2, groups)) | self.assign(c, Own(2, groups))
            for p in (a, d, dt_bias):
                ch |= self.assign(p, Own(0, heads))
            ch |= self.assign(init, Own(1, heads))
        return ch


# ----------------------------------------------------------------------------------------------
# Rewriting a solved region
# ----------------------------------------------------------------------------------------------


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


class ShardTensorParallel(Transform):
    name = "shard_tensor_parallel"
    Config = ShardTensorParallelConfig
    requires = ("match_attention",)

    def apply(self, gm: GraphModule, info: TransformInfo) -> None:
        rank, ws = self.config.rank, self.config.world_size
        if not isinstance(ws, int) or ws < 1 or not isinstance(rank, int) or not 0 <= rank < ws:
            raise ValueError(f"{self.name}: need 0 <= rank < world_size, got rank={rank!r}, world_size={ws!r}")
        info.details.update(rank=rank, world_size=ws)
        if ws == 1:
            return
        if gm.meta.get("autodeploy_caches"):
            raise ValueError(f"{self.name} must run before insert_cached_attention / insert_cached_ssm: "
                             "caches are sized from the sharded head counts")
        slicer = _ParamSlicer(gm)
        sharded, replicated, replicated_kv = [], [], []
        for region in find_regions(gm):
            _check_heads(region, ws)
            try:
                own = _Solver(region, rank, ws).solve()
                plan = _plan_region(region, own, slicer)
            except _Unsupported as e:
                logger.warning("shard_tensor_parallel: %s stays replicated on every rank: %s", region.name, e)
                replicated.append(region.name)
                continue
            if any(n.target == ATTENTION and _shape(n.args[1])[2] < ws for n in region.nodes):
                replicated_kv.append(region.name)
            slicer.commit(plan)
            _rewrite_sizes(region, own)
            _insert_all_reduce(gm, region.row)
            sharded.append(region.name)
            info.num_matches += 1
        info.details.update(all_reduces=len(sharded), sharded=sharded, replicated=replicated,
                            replicated_kv_heads=replicated_kv)
        if sharded:
            _refresh_shapes(gm)
            info.changed = True
