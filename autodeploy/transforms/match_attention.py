"""match_attention: replace attention subgraphs with ``autodeploy::attention``.

Before (either idiom, q/k/v in [b, h, s, d], k/v possibly through ``repeat_kv``)::

    sdpa(q, repeat_kv(k), repeat_kv(v), attn_mask=mask | is_causal=True, scale=s)

    w = matmul(q, repeat_kv(k).transpose(-2, -1)) * s     # or / (1/s)
    w = tanh(w / c) * c                                   # optional soft-cap
    w = w + mask  |  w.masked_fill(~keep, -inf)           # the causal / sliding-window mask
    out = matmul(dropout(softmax(w).to(dtype), train=False), repeat_kv(v))

After::

    out = autodeploy.attention(q.T(1,2), k.T(1,2), v.T(1,2), s, window, c, None[, chunk]).transpose(1, 2)

The mask is read off the graph, not guessed: its subgraph is evaluated on a probe sequence and
must be exactly causal, causal with a sliding window W (query i sees keys i-W+1..i), or
block-local causal with chunk C (query i sees keys C*(i//C)..i, Llama 4's local layers). Anything
else (no mask and not causal, ALiBi-like biases, odd masks) stays as it is and is reported in a
warning that names the module (an uncached graph still runs unchanged), or, with
``unmatched="error"`` (what a cached engine asks for), is an error.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from autodeploy.fx_utils import owning_module, subgraph_module
from autodeploy.graph_record import graph_record
from autodeploy.transforms.base import Transform, TransformConfig, TransformInfo

logger = logging.getLogger("autodeploy.transforms")
aten = torch.ops.aten

SDPA = {aten.scaled_dot_product_attention.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL = {aten.matmul.default, aten.bmm.default}
TRANSPARENT = {aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.contiguous.default,
               aten.alias.default}
DROPOUT = {aten.dropout.default}
VIEW_LIKE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


NOT_ATTENTION_MARK = " (not attention)"
MASKED_LOGIT = -1e4  # an additive mask entry at or below this drops the key (exp underflows to 0)


class UnmatchedAttention(Exception):
    """An attention-shaped subgraph that cannot be expressed as the canonical op (message says why)."""


class NotAttention(UnmatchedAttention):
    """A softmax that is not attention (e.g. a router's): nothing a cache would have to hold."""


class UncacheableAttention(ValueError):
    """Attention that a cached engine cannot serve exactly (``unmatched="error"``); names the layers."""


@dataclass
class MatchAttentionConfig(TransformConfig):
    # Length at which masks are probed. A window >= probe_length cannot be told apart from full
    # causal attention; it is capped at the exported max_seq_len, where that makes it exact.
    probe_length: int = 1024
    # what to do with attention that cannot be expressed as the canonical op: "warn" (left as
    # exported: right for an uncached graph) or "error" (a cached engine, where a layer left as
    # exported sees only the tokens of the current step, so it would give wrong tokens)
    unmatched: str = "warn"


def _arg(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _val(node) -> torch.Tensor | None:
    return node.meta.get("val") if isinstance(node, Node) else None


def _skip_transparent(node):
    while isinstance(node, Node) and node.target in TRANSPARENT:
        node = node.args[0]
    return node


def strip_repeat_kv(node: Node) -> Node:
    """Undo transformers' ``repeat_kv`` (unsqueeze(2) -> expand -> reshape) and repeat_interleave."""
    if node.target in VIEW_LIKE and isinstance(node.args[0], Node) and node.args[0].target == aten.expand.default:
        unsq = node.args[0].args[0]
        if isinstance(unsq, Node) and unsq.target == aten.unsqueeze.default and unsq.args[1] in (2, -3):
            src = unsq.args[0]
            while isinstance(src, Node) and src.target == aten.slice.Tensor and _is_full_slice(src):
                src = src.args[0]
            return src
    if node.target == aten.repeat_interleave.self_int and _arg(node, 2, "dim") in (1, -3):
        return node.args[0]
    return node


def _is_full_slice(node: Node) -> bool:
    start = _arg(node, 2, "start", None)
    end = _arg(node, 3, "end", None)
    step = _arg(node, 4, "step", 1)
    return start in (None, 0) and (end is None or end == sys.maxsize) and step == 1


def _strip_key_transpose(node: Node) -> Node | None:
    """k^T [b, h, d, s] -> k [b, h, s, d] if ``node`` is a transpose of the last two dims."""
    if node.target == aten.transpose.int:
        dims = {d % 4 for d in node.args[1:3]}
        if dims == {2, 3}:
            return node.args[0]
    return None


def _scalar(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


class MaskProbe:
    """Evaluate mask subgraphs on a probe sequence and classify them (cached per mask node)."""

    def __init__(self, gm: GraphModule, length: int):
        self.gm = gm
        self.length = length
        self.cache: dict[tuple[Node, bool], tuple[int, int]] = {}

    def kind(self, mask: Node, additive: bool) -> tuple[int, int]:
        """(window, chunk): (0, 0) for plain causal, (W, 0) for a sliding window, (0, C) for
        block-local attention with chunk C; raises UnmatchedAttention otherwise."""
        key = (mask, additive)
        if key not in self.cache:
            self.cache[key] = self._classify(self._evaluate(mask), additive)
        return self.cache[key]

    def window(self, mask: Node, additive: bool) -> int:
        """The sliding window of a causal or sliding-window mask (0: plain causal)."""
        window, chunk = self.kind(mask, additive)
        if chunk:
            raise UnmatchedAttention(f"block-local (chunked, C={chunk}) mask where only a window is supported")
        return window

    def _evaluate(self, mask: Node) -> torch.Tensor:
        sub, placeholders = subgraph_module(self.gm, mask)
        args = []
        for p in placeholders:
            val = p.meta.get("val")
            device = val.device if isinstance(val, torch.Tensor) else "cpu"
            if "position" in str(p.target):
                args.append(torch.arange(self.length, device=device)[None])
            else:
                args.append(torch.zeros(1, self.length, dtype=torch.long, device=device))
        with torch.no_grad():
            return sub(*args)

    def _classify(self, mask: torch.Tensor, additive: bool) -> tuple[int, int]:
        L = self.length
        if mask.shape[-2:] != (L, L):
            raise UnmatchedAttention(f"mask has shape {tuple(mask.shape)} at probe length {L}, expected [.., {L}, {L}]")
        if additive:
            # kept: exactly 0; dropped: -inf or a large negative (transformers uses finfo.min)
            keep = mask == 0
            if not torch.all(keep | (mask <= MASKED_LOGIT)):
                raise UnmatchedAttention("additive mask has small non-zero entries (a bias, not a mask)")
        else:
            keep = mask.bool()
        keep = keep.reshape(-1, L, L)
        if not torch.all(keep == keep[:1]):
            raise UnmatchedAttention("mask differs across batch/heads")
        keep = keep[0].cpu()
        i = torch.arange(L)[:, None]
        j = torch.arange(L)[None, :]
        chunk = int(keep[:, 0].sum())  # block-local: the rows that see key 0 are the first block
        if 0 < chunk < L and torch.equal(keep, (j <= i) & (i // chunk == j // chunk)):
            return 0, chunk
        width = int(keep[-1].sum())
        expected = (j <= i) & (j > i - width)
        if width == 0 or not torch.equal(keep, expected):
            raise UnmatchedAttention("mask is neither causal, a causal sliding window nor block-local causal: "
                                     f"{describe_mask(keep)}")
        return (0 if width >= L else width), 0


def _ranges(keys: list[int]) -> str:
    out, start = [], None
    for j, k in enumerate(keys):
        if start is None:
            start = k
        if j + 1 == len(keys) or keys[j + 1] != k + 1:
            out.append(str(start) if start == k else f"{start}..{k}")
            start = None
    return ", ".join(out) or "none"


def describe_mask(keep: torch.Tensor) -> str:
    """Where a keep-mask [L, L] first departs from plain causal attention, in words."""
    keep = keep.cpu().bool()
    L = keep.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    if keep[:, :].triu(1).any():
        i = int(keep.triu(1).any(-1).nonzero()[0])
        return f"query {i} sees later keys (keys {_ranges(keep[i].nonzero().flatten().tolist())}): not causal"
    i = int((keep != causal).any(-1).nonzero()[0])
    return f"query {i} sees keys {_ranges(keep[i].nonzero().flatten().tolist())}"


class MatchAttention(Transform):
    """Replace SDPA and eager matmul/softmax attention with ``autodeploy::attention``."""

    name = "match_attention"
    Config = MatchAttentionConfig

    def apply(self, gm: GraphModule, info: TransformInfo) -> None:
        exported_len = graph_record(gm).max_seq_len
        length = self.config.probe_length
        if exported_len is not None:
            length = min(length, exported_len)
        if self.config.unmatched not in ("warn", "error"):
            raise ValueError(f"{self.name}: unmatched must be 'warn' or 'error', got {self.config.unmatched!r}")
        matched, unmatched = self.replace_all(gm, MaskProbe(gm, length))
        info.num_matches, info.changed = matched, matched > 0
        info.details["unmatched"] = unmatched
        if self.config.unmatched == "error":
            uncacheable = [line for line in unmatched if not line.endswith(NOT_ATTENTION_MARK)]
            if uncacheable:
                raise UncacheableAttention(
                    "cannot serve this attention exactly with a KV cache: " + "; ".join(uncacheable)
                    + ". Left as exported, a layer would see only the tokens of the current step; supported: "
                    "causal, causal sliding-window and block-local (chunked) causal masks. "
                    "torch.compile(model, backend='autodeploy') runs such a model uncached")
        for line in unmatched:
            logger.warning("match_attention: left unmatched, runs as exported: %s", line)

    def replace_all(self, gm: GraphModule, probe: MaskProbe) -> tuple[int, list[str]]:
        """Replace every attention ``probe`` can read the mask of: (matches, unmatched reasons).
        Also used by the torch.compile backend with its own probe."""
        matched, unmatched = 0, []
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in SDPA | SOFTMAX:
                continue
            try:
                if node.target in SDPA:
                    self._replace_sdpa(gm, node, probe)
                else:
                    self._replace_eager(gm, node, probe)
                matched += 1
            except UnmatchedAttention as why:
                mark = NOT_ATTENTION_MARK if isinstance(why, NotAttention) else ""
                unmatched.append(f"{owning_module(node) or '<root>'} ({node.name}): {why}{mark}")
        return matched, unmatched

    # -- SDPA ------------------------------------------------------------------------------------
    def _replace_sdpa(self, gm: GraphModule, node: Node, probe: MaskProbe) -> None:
        q, k, v = node.args[:3]
        mask = _arg(node, 3, "attn_mask")
        dropout = _arg(node, 4, "dropout_p", 0.0)
        is_causal = _arg(node, 5, "is_causal", False)
        scale = _arg(node, 6, "scale")
        if dropout not in (0, 0.0):
            raise UnmatchedAttention(f"dropout_p={dropout} (only inference graphs are supported)")
        if mask is not None and is_causal:
            raise UnmatchedAttention("both attn_mask and is_causal given")
        if mask is None and not is_causal:
            raise UnmatchedAttention("SDPA without a mask and with is_causal=False: bidirectional, every query "
                                     "sees every key, later ones included")
        window = chunk = 0
        if mask is not None:
            mval = _val(mask)
            window, chunk = probe.kind(mask, additive=mval is not None and mval.dtype.is_floating_point)
        q_val = _val(q)
        if scale is None:
            if q_val is None:
                raise UnmatchedAttention("unknown head_dim for the default scale")
            scale = 1.0 / math.sqrt(q_val.shape[-1])
        self._insert(gm, node, q, strip_repeat_kv(k), strip_repeat_kv(v), float(scale), window, 0.0, chunk)

    # -- eager -----------------------------------------------------------------------------------
    def _replace_eager(self, gm: GraphModule, softmax: Node, probe: MaskProbe) -> None:
        dim = softmax.args[1]
        val = _val(softmax.args[0])
        if dim not in (-1, 3) and not (val is not None and dim == val.dim() - 1):
            raise NotAttention(f"softmax over dim {dim}, not the last")
        # output side: softmax -> [to] -> [dropout(train=False)] -> [to] -> matmul(., v)
        user, chain = softmax, [softmax]
        while True:
            if len(user.users) != 1:
                if not any(u.target in MATMUL for u in user.users):
                    raise NotAttention("softmax output has several users, none a matmul")
                raise UnmatchedAttention("softmax output has several users (attention probabilities used elsewhere)")
            (nxt,) = user.users
            if nxt.target in TRANSPARENT:
                user = nxt
            elif nxt.target in DROPOUT:
                if _arg(nxt, 2, "train", False):
                    raise UnmatchedAttention("dropout in training mode")
                user = nxt
            else:
                break
            chain.append(user)
        pv = nxt
        if pv.target not in MATMUL or pv.args[0] is not user:
            raise NotAttention("softmax is not followed by probs @ v")
        v = pv.args[1]
        # input side: matmul -> [scale] -> [soft-cap] -> [mask] -> softmax
        x = _skip_transparent(softmax.args[0])
        window, chunk, has_mask = 0, 0, False
        if x.target == aten.add.Tensor and all(isinstance(a, Node) for a in x.args[:2]):
            scores, mask = self._split_scores_mask(x)
            window, chunk = probe.kind(mask, additive=True)
            x, has_mask = _skip_transparent(scores), True
        elif x.target == aten.masked_fill.Scalar:
            fill = x.args[2]
            if not (isinstance(fill, (int, float)) and fill <= MASKED_LOGIT):
                raise UnmatchedAttention(f"masked_fill with {fill}, expected -inf")
            window, chunk = self._masked_fill_kind(x.args[1], probe)
            x, has_mask = _skip_transparent(x.args[0]), True
        if not has_mask:
            raise UnmatchedAttention("no mask before softmax: not causal")
        soft_cap = 0.0
        if x.target == aten.mul.Tensor and isinstance(x.args[0], Node) and x.args[0].target == aten.tanh.default:
            cap = _scalar(x.args[1])
            inner = x.args[0].args[0]
            if cap is not None and inner.target == aten.div.Tensor and _scalar(inner.args[1]) == cap:
                soft_cap, x = cap, _skip_transparent(inner.args[0])
            else:
                raise UnmatchedAttention("tanh before softmax is not a soft-cap tanh(x / c) * c")
        scale = 1.0
        if x.target == aten.mul.Tensor and _scalar(x.args[1]) is not None:
            scale, x = _scalar(x.args[1]), _skip_transparent(x.args[0])
        elif x.target == aten.div.Tensor and _scalar(x.args[1]) is not None:
            scale, x = 1.0 / _scalar(x.args[1]), _skip_transparent(x.args[0])
        if x.target not in MATMUL:
            raise UnmatchedAttention(f"scores come from {x.target}, expected q @ k^T")
        q, kt = x.args[:2]
        k = _strip_key_transpose(kt)
        if k is None:
            raise UnmatchedAttention("second matmul operand is not k.transpose(-2, -1)")
        for t in (q, k, v):
            val = _val(t)
            if val is not None and val.dim() != 4:
                raise UnmatchedAttention(f"operands of rank {val.dim()}, expected [b, h, s, d]")
        self._insert(gm, pv, q, strip_repeat_kv(k), strip_repeat_kv(v), scale, window, soft_cap, chunk)
        for node in reversed(chain):  # dropout is impure, so dead-code elimination keeps it
            if not node.users:
                gm.graph.erase_node(node)

    @staticmethod
    def _split_scores_mask(add: Node) -> tuple[Node, Node]:
        a, b = add.args[:2]
        # the mask does not depend on the activations: it has no matmul among its ancestors
        return (a, b) if _depends_on_matmul(a) and not _depends_on_matmul(b) else (b, a)

    @staticmethod
    def _masked_fill_kind(fill_mask: Node, probe: MaskProbe) -> tuple[int, int]:
        # masked_fill(scores, m, -inf): m marks the positions to drop; probe ~m as a keep-mask
        if fill_mask.target == aten.bitwise_not.default or fill_mask.target == aten.logical_not.default:
            return probe.kind(fill_mask.args[0], additive=False)
        if fill_mask.target == aten.eq.Scalar and fill_mask.args[1] == 0:
            return probe.kind(fill_mask.args[0], additive=False)
        raise UnmatchedAttention("masked_fill mask is not ~keep or keep == 0")

    # -- replacement -----------------------------------------------------------------------------
    @staticmethod
    def _insert(gm: GraphModule, old: Node, q: Node, k: Node, v: Node, scale: float, window: int,
                soft_cap: float, chunk: int = 0) -> None:
        qv, kv = _val(q), _val(k)
        if qv is not None and kv is not None and qv.shape[1] % kv.shape[1]:
            raise UnmatchedAttention(f"{qv.shape[1]} query heads not a multiple of {kv.shape[1]} kv heads")
        g = gm.graph
        with g.inserting_before(old):
            qt, kt, vt = (g.call_function(aten.transpose.int, (t, 1, 2)) for t in (q, k, v))
            att = g.call_function(
                torch.ops.autodeploy.attention.default,
                (qt, kt, vt, scale, window, soft_cap, None, *((chunk,) if chunk else ())),
            )
            out = g.call_function(aten.transpose.int, (att, 1, 2))
        for n in (qt, kt, vt, att, out):
            n.meta["nn_module_stack"] = old.meta.get("nn_module_stack", {})
        if _val(old) is not None:
            with torch.no_grad(), _fake_mode(_val(old)):
                vals = [_val(t).transpose(1, 2) for t in (q, k, v)]
                att.meta["val"] = torch.ops.autodeploy.attention.default(*vals, scale, window, soft_cap, None, chunk)
                out.meta["val"] = att.meta["val"].transpose(1, 2)
                for n, val in zip((qt, kt, vt), vals):
                    n.meta["val"] = val
        old.replace_all_uses_with(out)
        g.erase_node(old)


def _depends_on_matmul(node: Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, Node):
            continue
        seen.add(n)
        if n.target in MATMUL or n.target == aten.linear.default:
            return True
        stack.extend(n.all_input_nodes)
    return False


def _fake_mode(val: torch.Tensor):
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([val])
    return contextlib.nullcontext() if mode is None else mode


__all__ = ["MatchAttention", "MatchAttentionConfig", "NotAttention", "UncacheableAttention", "UnmatchedAttention",
           "describe_mask", "strip_repeat_kv"]

