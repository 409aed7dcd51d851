"""shard_tensor_parallel's solver: which indices of every tensor of a region a rank owns, propagated
from the row linear's input through views, splits, pointwise ops, reductions and the canonical ops."""

from __future__ import annotations

import math
import operator

import torch
from torch.fx import Node

import autodeploy.custom_ops.all_reduce  # noqa: F401  (registers autodeploy::all_reduce)
from autodeploy.fx_utils import owning_module
from autodeploy.transforms.tensor_parallel.regions import (
    ATTENTION,
    CONV,
    REDUCTIONS,
    SOFTMAX,
    SPLITS,
    SSD_SCAN,
    VIEWS,
    Own,
    Region,
    ShardingError,
    _carries_tensor,
    _is_elementwise,
    _norm,
    _shape,
    _Unsupported,
    _val,
    aten,
)


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
