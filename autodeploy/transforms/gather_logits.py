"""gather_logits: compute the LM head only for the rows whose logits are used.

Before::

    h = <residual stream>                  # [1, T, hidden]
    logits = lm_head(final_norm(h))        # [1, T, vocab]   (+ soft-cap etc.)

After::

    rows = autodeploy.prepare_logit_rows(input_ids, seq_lens, verify, 1 + K)
    logits = lm_head(final_norm(index_select(h, 1, rows)))   # [1, min(T, lanes * (1 + K)), vocab]

The rows (the last token of each lane, all 1 + K tokens of a verify lane; see
``prepare_logit_rows``) are computed in the graph from the raw inputs. The cut is placed as early
as the per-token tail of the graph allows: through the LM head, casts, soft-caps and a matched
``autodeploy::rms_norm``, so a 2k-token prefill chunk never materialises [2k, vocab] logits. The
graph's output then holds the returned rows lane after lane; the graph's record (``logit_rows``,
``max_draft_tokens``) tells the runner so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from autodeploy.graph_record import add_input, record_bound, update_record
from autodeploy.transforms.base import Transform, TransformConfig, TransformInfo

aten = torch.ops.aten
PREPARE_ROWS = torch.ops.autodeploy.prepare_logit_rows.default
RMS_NORM = torch.ops.autodeploy.rms_norm.default
# ops that act on each token's row alone, with exactly one token-carrying input (argument 0)
_UNARY = {aten.alias.default, aten.to.dtype, aten._to_copy.default, aten.tanh.default, aten.clone.default,
          aten.linear.default, RMS_NORM}
_WITH_CONSTANT = {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor}


@dataclass
class GatherLogitsConfig(TransformConfig):
    max_draft_tokens: int = 0  # K: a verify lane returns 1 + K rows


def _token_input(node: Node) -> Node | None:
    """The one token-carrying input of a per-token op, or None if ``node`` is not one."""
    if node.op != "call_function":
        return None
    args = [a for a in node.args if isinstance(a, Node)] + [a for a in node.kwargs.values() if isinstance(a, Node)]
    if node.target in _UNARY:
        x = node.args[0]
        rest = [a for a in args if a is not x]
        if node.target is RMS_NORM and node.args[2] is not None:
            return None  # a gated norm has two token inputs
    elif node.target in _WITH_CONSTANT:
        x = next((a for a in node.args[:2] if isinstance(a, Node) and _has_tokens(a)), None)
        rest = [a for a in args if a is not x]
    else:
        return None
    if not isinstance(x, Node) or any(_has_tokens(a) for a in rest):
        return None
    return x


def _has_tokens(node: Node) -> bool:
    """A [1, T, ...] activation (its token dim symbolic), not a weight or a constant."""
    val = node.meta.get("val")
    return (isinstance(val, torch.Tensor) and val.dim() >= 2 and val.shape[0] == 1
            and not isinstance(val.shape[1], int))


class GatherLogits(Transform):
    name = "gather_logits"
    Config = GatherLogitsConfig

    def apply(self, gm: GraphModule, info: TransformInfo) -> None:
        k = self.config.max_draft_tokens
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"{self.name}: max_draft_tokens must be an int >= 0, got {k!r}")
        graph = gm.graph
        output = next(n for n in graph.nodes if n.op == "output")
        logits = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
        if len(output.args[0] if isinstance(output.args[0], (tuple, list)) else [logits]) != 1:
            raise ValueError(f"{self.name}: the graph must return the logits alone")
        # walk up the per-token tail: logits <- soft-cap <- lm_head <- final norm <- ...
        if _token_input(logits) is None:
            raise ValueError(f"{self.name}: the logits node {logits.name} ({logits.target}) is not a per-token "
                             "op of the hidden state; cannot gather rows")
        chain, node = [logits], logits
        while len((x := _token_input(node)).users) == 1 and _token_input(x) is not None:
            chain.append(x)
            node = x
        cut_input = _token_input(node)
        input_ids = next(n for n in graph.nodes if n.op == "placeholder")
        seq_lens, verify = add_input(gm, "seq_lens"), add_input(gm, "verify")
        with graph.inserting_before(node):
            rows = graph.call_function(PREPARE_ROWS, (input_ids, seq_lens, verify, 1 + k))
            gathered = graph.call_function(aten.index_select.default, (cut_input, 1, rows))
        node.replace_input_with(cut_input, gathered)
        record_bound(gm, "max_draft_tokens", k, self.name)  # 1 + K rows per lane at most
        update_record(gm, logit_rows=True)
        info.num_matches = 1
        info.changed = True
        info.details["gathered_before"] = str(node.target)
        info.details["ops_on_rows"] = len(chain)
        info.details["lm_head_on_rows"] = any(n.target == aten.linear.default for n in chain)
