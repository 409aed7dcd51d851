"""fuse_mamba_decode: a Mamba2 mixer's cached conv, SSD scan and gated norm -> one fused op.

Before (what ``insert_cached_ssm`` with the Triton backend leaves, per mixer)::

    h = autodeploy.triton_cached_causal_conv1d(xBC, w, b, act, conv_state, replay_conv, *lanes)
    x, B, C = split(transpose(h, 1, 2), [h*p, g*n, g*n], -1)
    y = autodeploy.triton_cached_ssd_scan(view(x), dt, A, view(B), view(C), D, dt_bias, ssm_state, ..., *lanes, ...)
    out = autodeploy.rms_norm(reshape(to(y)), norm_w, gate, eps, (h/g)*p, offset, cast_first, out_dtype)

After::

    counters = autodeploy.mamba_mixer_counters(input_ids, mixers, groups)    # once per graph
    out = autodeploy.triton_cached_mamba_mixer(xBC, dt, gate, w, b, act, A, D, dt_bias, norm_w, conv_state,
                                               replay_conv, ssm_state, replay_x, replay_dt, replay_B, *lanes,
                                               counters, i, h, p, g, n, ...)

One launch per layer for decode steps (``triton_mamba_mixer`` says which steps and why). Only the
Triton SSM backend's ops are matched, so the torch backend (the oracle) and the flashinfer one stay
as they are; only chains whose every intermediate has no other user, whose split is [x, B, C] of
the scan's shapes, and whose norm groups are the SSM groups, are fused; anything else stays
unfused and is counted in ``details["unfused"]``.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from autodeploy.fx_utils import is_op, op_kwargs
from autodeploy.transforms.base import Transform, TransformInfo

aten = torch.ops.aten
# the Triton backend's ops, by name: their modules are imported only when that backend is chosen
SCAN, CONV = "autodeploy::triton_cached_ssd_scan", "autodeploy::triton_cached_causal_conv1d"
RMS_NORM = torch.ops.autodeploy.rms_norm.default
_BETWEEN = (aten.to.dtype, aten._to_copy.default, aten.reshape.default, aten.view.default)  # scan -> norm


def _is_named(node, name: str) -> bool:
    return (isinstance(node, Node) and node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target._schema.name == name)


def _only_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _match(scan: Node) -> dict | None:
    """The nodes of one mixer's conv -> scan -> norm chain ending at ``scan``, or None."""
    kw = op_kwargs(scan)
    views, parts = [], []
    for name in ("x", "B", "C"):
        view = kw[name]
        if not is_op(view, aten.view.default, aten.reshape.default) or _only_user(view) is not scan:
            return None
        part = view.args[0]
        if not (isinstance(part, Node) and part.target is operator.getitem and _only_user(part) is view):
            return None
        views.append(view)
        parts.append(part)
    split = parts[0].args[0]
    if any(p.args[0] is not split for p in parts) or [p.args[1] for p in parts] != [0, 1, 2]:
        return None
    if not is_op(split, aten.split_with_sizes.default) or len(split.users) != 3:
        return None
    transpose = split.args[0]
    if not is_op(transpose, aten.transpose.int) or _only_user(transpose) is not split:
        return None
    conv = transpose.args[0]
    if not _is_named(conv, CONV) or _only_user(conv) is not transpose or sorted(transpose.args[1:]) != [1, 2]:
        return None
    ckw = op_kwargs(conv)
    lanes = ("slots", "cu_seqlens", "has_state", "replay_lens", "is_verify")
    if any(ckw[k] is not kw[k] for k in lanes):
        return None
    _, _, h, p = kw["x"].meta["val"].shape
    g, n = kw["B"].meta["val"].shape[2:]
    dim = split.args[2] if len(split.args) > 2 else 0
    if list(split.args[1]) != [h * p, g * n, g * n] or dim not in (-1, 2):
        return None
    chain, node = [], _only_user(scan)
    while node is not None and is_op(node, *_BETWEEN) and _only_user(node) is not None:
        chain.append(node)
        node = _only_user(node)
    norm = node
    if not is_op(norm, RMS_NORM):
        return None
    nkw = op_kwargs(norm)
    source = chain[-1] if chain else scan
    groups_ok = nkw["group_size"] == (h // g) * p or (g == 1 and nkw["group_size"] == 0)  # norm groups = SSM groups
    if nkw["x"] is not source or nkw["gate"] is None or not groups_ok:
        return None
    shapes = [c.meta["val"] for c in chain] + [scan.meta["val"]]
    dtypes = {scan.meta["val"].dtype, *(s.dtype for s in shapes)}
    norm_in = source.meta["val"]
    if norm_in.shape[-1] != h * p or len(dtypes) > 2:  # one cast at most between the scan and the norm
        return None
    return dict(scan=scan, kw=kw, conv=conv, ckw=ckw, views=views, parts=parts, split=split, transpose=transpose,
                chain=chain, norm=norm, nkw=nkw, h=h, p=p, g=g, n=n, norm_in=norm_in.dtype)


class FuseMambaDecode(Transform):
    name = "fuse_mamba_decode"
    requires = ("insert_cached_ssm",)

    def apply(self, gm: GraphModule, info: TransformInfo) -> None:
        scans = [n for n in gm.graph.nodes if _is_named(n, SCAN)]
        if not scans:
            return
        from autodeploy.custom_ops import triton_mamba_mixer  # noqa: F401  (registers the ops)

        matches = [m for m in map(_match, scans) if m is not None]
        info.details["unfused"] = len(scans) - len(matches)
        if not matches:
            return
        graph = gm.graph
        input_ids = next(n for n in graph.nodes if n.op == "placeholder")
        groups = max(m["g"] for m in matches)
        first = min((m["conv"] for m in matches), key=list(graph.nodes).index)
        with graph.inserting_before(first):
            counters = graph.call_function(torch.ops.autodeploy.mamba_mixer_counters.default,
                                           (input_ids, len(matches), groups))
        for layer, m in enumerate(matches):
            kw, ckw, nkw = m["kw"], m["ckw"], m["nkw"]
            args = (ckw["x"], kw["dt"], nkw["gate"], ckw["weight"], ckw["bias"], ckw["activation"], kw["A"], kw["D"],
                    kw["dt_bias"], nkw["weight"], ckw["conv_state"], ckw["replay_conv"], kw["ssm_state"],
                    kw["replay_x"], kw["replay_dt"], kw["replay_B"], kw["slots"], kw["cu_seqlens"], kw["has_state"],
                    kw["replay_lens"], kw["is_verify"], counters, layer, m["h"], m["p"], m["g"], m["n"],
                    kw["dt_softplus"], kw["dt_min"], kw["dt_max"], kw["chunk_size"], m["norm_in"], nkw["eps"],
                    nkw["weight_offset"], nkw["cast_first"], nkw["out_dtype"])
            norm = m["norm"]
            with graph.inserting_before(norm):
                fused = graph.call_function(torch.ops.autodeploy.triton_cached_mamba_mixer.default, args)
            fused.meta["val"] = norm.meta.get("val")
            fused.meta["nn_module_stack"] = m["scan"].meta.get("nn_module_stack")
            norm.replace_all_uses_with(fused)
            for node in [norm, *reversed(m["chain"]), m["scan"], *m["views"], *m["parts"], m["split"],
                         m["transpose"], m["conv"]]:
                graph.erase_node(node)
            info.num_matches += 1
        info.changed = True
