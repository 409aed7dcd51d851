"""Build-time self-check: the cached graph, run as the engine runs it, against the model itself.

Before an engine serves anything, a short probe goes through its own runner (the same graph,
compile mode, CUDA graphs and backends): two requests, prefilled in several chunks (the second
one shorter, so it turns to decoding while the first still prefills), then decode steps. The
logits of every step are compared with the model's own uncached forward over each request's
whole sequence, in the same dtype on the same device. A mismatch is a :class:`SelfCheckError`
naming the first module whose output differs and what was probably not captured: positions (a
model that computes them itself instead of reading ``position_ids``), state carried between
steps (a mask, a window, a sequence-mixing op), or tokens of one request leaking into another.

Tolerance. float32: max |difference| <= 1e-3 * max(1, max |reference logit|), as export's own
check (the cached kernels differ from the forward by reordered float32 sums, ~1e-5 here).
bfloat16 / float16: the root-mean-square of the difference of the mean-centred logit rows (softmax
ignores a shift) <= 0.05 (bf16) / 0.00625 (fp16) of the reference row's standard deviation, i.e.
12.8 units of the format's rounding (2^-8, 2^-11). The graph and the uncached forward round at
different places (chunked prefill, other kernels and GEMM tilings); measured on the zoo models and
the hand-written ones on the CPU (2-4 layers), that moves the logits by at most 4 units (bf16
0.0155, fp16 0.0019), so the bound leaves a margin of 3 for deeper models. What the check is for
(lost positions, state or masks) moves the logits of a trained model by the order of their spread;
on the tiny random models of the tests the positions case moves them by 0.03-0.07 (caught in
bf16 and fp16; in float32, 0.37 against a bound of 0.014).

The layer-level diagnosis runs only on a mismatch: the same probe through a cached graph built
without the performance transforms, run eagerly through an FX interpreter that records every
module's output, compared with forward hooks on the model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.fx import GraphModule, Interpreter, Node

from autodeploy.export import LogitsOnly
from autodeploy.fx_utils import EXPORT_ROOT
from autodeploy.runtime.batch import LaneInput
from autodeploy.runtime.pools import PoolExhausted, PoolSizes

logger = logging.getLogger("autodeploy")

__all__ = ["SelfCheckError", "self_check", "probe_schedule"]

FP32_ATOL = 1e-3  # times max(1, max |reference logit|)
LOW_PRECISION_RMS = {torch.bfloat16: 0.05, torch.float16: 0.00625}  # per row: rms(centred difference) / std(ref)


class SelfCheckError(ValueError):
    """The cached engine's logits differ from the model's own forward: serving would be wrong."""


@dataclass
class Step:
    lanes: list[tuple[int, int, int]]  # (request, first position, token count)


def probe_schedule(sizes: PoolSizes) -> tuple[list[int], list[Step]] | None:
    """Request lengths and the steps that run them, within the engine's limits. Request 0: three
    prefill chunks, then a decode step. Request 1: two chunks (the second one token shorter), then
    decode steps, the first beside request 0's third chunk. One request when there is one lane;
    None if nothing fits."""
    two = sizes.max_batch_size > 1 and sizes.max_num_tokens >= 4
    chunk = min(4, sizes.max_num_tokens // 2 if two else sizes.max_num_tokens)
    while chunk >= 1 and 3 * chunk + 1 > sizes.max_seq_len:
        chunk -= 1
    if chunk < 1:
        return None
    if not two or chunk < 2:
        return [3 * chunk + 1], [Step([(0, i * chunk, chunk)]) for i in range(3)] + [Step([(0, 3 * chunk, 1)])]
    short = 2 * chunk - 1  # request 1's prompt
    steps = [Step([(0, 0, chunk), (1, 0, chunk)]),
             Step([(0, chunk, chunk), (1, chunk, chunk - 1)]),
             Step([(0, 2 * chunk, chunk), (1, short, 1)]),
             Step([(0, 3 * chunk, 1), (1, short + 1, 1)])]
    return [3 * chunk + 1, short + 2], steps


def _rows_of(step: Step) -> list[tuple[int, int]]:
    """(request, position) of each logit row the runner returns for ``step``: each lane's last token."""
    return [(r, start + n - 1) for r, start, n in step.lanes]


def _row_error(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """(error, tolerance) of one row of logits or activations; see the module docstring."""
    got, ref = got.double().cpu().flatten(), ref.double().cpu().flatten()
    if not torch.isfinite(got).all():
        return float("inf"), 0.0
    if dtype not in LOW_PRECISION_RMS:
        return (got - ref).abs().max().item(), FP32_ATOL * max(1.0, ref.abs().max().item())
    diff = (got - got.mean()) - (ref - ref.mean())
    spread = (ref - ref.mean()).pow(2).mean().sqrt().item()
    return diff.pow(2).mean().sqrt().item() / max(spread, 1e-6), LOW_PRECISION_RMS[dtype]


def _first_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    return next((o for o in items if isinstance(o, torch.Tensor)), None)


@torch.no_grad()
def _reference(model: nn.Module, tokens: list[list[int]], device, hooks: dict[str, nn.Module] | None = None):
    """The model's own uncached forward over each request: logits [len, vocab] per request, and
    (with ``hooks``) each hooked module's first tensor output per request."""
    call = LogitsOnly(model)
    outs, recorded = [], []
    for seq in tokens:
        seen: dict[str, torch.Tensor | None] = {}
        handles = []
        for name, module in (hooks or {}).items():
            def hook(mod, args, out, name=name):
                seen[name] = None if name in seen else _first_tensor(out)  # called twice: no single output
            handles.append(module.register_forward_hook(hook))
        try:
            ids = torch.tensor([seq], device=device)
            outs.append(call(ids, torch.arange(len(seq), device=device)[None])[0])
        finally:
            for h in handles:
                h.remove()
        recorded.append(seen)
    return outs, recorded


def _lanes(step: Step, tokens: list[list[int]], slots: list[int], pages: list[list[int]]) -> list[LaneInput]:
    return [LaneInput(tokens[r][start:start + n], start, slots[r], pages[r]) for r, start, n in step.lanes]


def _run_probe(runner, tokens: list[list[int]], steps: list[Step]):
    """Run the probe steps on ``runner`` with slots and pages of its own pools (freed after);
    returns each step's logits [lanes, vocab]."""
    pools, page_size = runner.pools, runner.sizes.page_size
    slots = pools.slots.allocate(len(tokens))
    pages: list[list[int]] = []
    try:
        for seq in tokens:
            pages.append(pools.pages.allocate(-(-len(seq) // page_size)) if pools.pages.capacity else [])
        out = []
        for step in steps:
            logits = runner.run(_lanes(step, tokens, slots, pages))
            out.append(logits.clone())
        return out
    finally:
        pools.slots.free(slots)
        for p in pages:
            pools.pages.free(p)


def _compare(steps: list[Step], got: list[torch.Tensor], ref: list[torch.Tensor], dtype: torch.dtype):
    """The first (step, request, position, error, tolerance) whose logits disagree, or None."""
    for index, (step, logits) in enumerate(zip(steps, got)):
        for row, (r, pos) in enumerate(_rows_of(step)):
            err, tol = _row_error(logits[row], ref[r][pos], dtype)
            if not err <= tol:
                return index, r, pos, err, tol
    return None


def self_check(model: nn.Module, runner, dtype: torch.dtype, plain_graph: Callable[[], GraphModule] | None = None,
               what: str = "the engine") -> float:
    """Run the probe through ``runner`` and compare with ``model``'s own forward; raises
    :class:`SelfCheckError` on a mismatch (naming the first module whose output differs, when
    ``plain_graph`` builds the cached graph without performance transforms). Returns seconds taken."""
    start = time.perf_counter()
    plan = probe_schedule(runner.sizes)
    if plan is None:
        logger.info("self-check skipped: max_seq_len %d is too short for a probe", runner.sizes.max_seq_len)
        return 0.0
    lens, steps = plan
    vocab = _vocab(model)
    g = torch.Generator().manual_seed(1234)
    tokens = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]
    device = next(iter(model.parameters()), torch.empty(0)).device
    try:
        got = _run_probe(runner, tokens, steps)
    except PoolExhausted as e:
        logger.info("self-check skipped: the caches cannot hold the probe (%s)", e)
        return 0.0
    ref, _ = _reference(model, tokens, device)
    bad = _compare(steps, got, ref, dtype)
    seconds = time.perf_counter() - start
    if bad is None:
        logger.info("self-check of %s passed: %d steps, %d requests, logits equal to %s's forward (%.2f s)",
                    what, len(steps), len(lens), type(model).__name__, seconds)
        return seconds
    index, r, pos, err, tol = bad
    n = next(n for q, _, n in steps[index].lanes if q == r)
    kind = "one-token step" if n == 1 else f"prefill chunk of {n} tokens"
    metric = "relative RMS logit difference" if dtype in LOW_PRECISION_RMS else "max |logit difference|"
    head = (f"self-check failed for {what}: its logits differ from {type(model).__name__}'s own forward "
            f"({metric} {err:.3g} > {tol:.3g} at step {index + 1} of {len(steps)}, request {r}, position {pos}, "
            f"a {kind})")
    where = _diagnose(model, runner, plain_graph, tokens, steps, device, dtype) if plain_graph is not None else ""
    raise SelfCheckError(f"{head}. {where}{_likely_cause(runner.gm, steps, got, ref, dtype)}. Serving it would give "
                         "wrong tokens; see docs/MODELS.md (DeployConfig(self_check=False) skips this check)")


def _vocab(model: nn.Module) -> int:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None and hasattr(model, "get_input_embeddings"):
        vocab = getattr(model.get_input_embeddings(), "num_embeddings", None)
    if vocab is None:
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        vocab = embeddings[0].num_embeddings if embeddings else 2
    return int(vocab)


def _likely_cause(gm: GraphModule, steps: list[Step], got, ref, dtype: torch.dtype) -> str:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) > 1 and placeholders[1].target == "position_ids" and not placeholders[1].users:
        return ("Probably not captured: positions. The graph never reads position_ids, so the model computes its "
                "positions itself (e.g. from arange(seq_len)); a cached engine feeds a request one chunk at a time, "
                "at positions cached..cached+n-1: read them from position_ids")
    if _compare(steps[:1], got[:1], ref, dtype) is None:
        return ("Probably not captured: state carried between steps (a mask, a window or a sequence-mixing op the "
                "caches do not hold): the first chunk of every request agrees, later chunks and decode steps do not")
    return ("Probably not captured: the requests' separation (tokens of one request reach another, e.g. through "
            "an op that mixes the whole flattened step) or the first chunk itself")


# -- diagnosis: module by module -------------------------------------------------------------------


def _module_paths(node: Node) -> list[str]:
    """Module paths (relative to the user's model) that ``node`` was produced inside, outermost first."""
    out = []
    for value in (node.meta.get("nn_module_stack") or {}).values():
        path = value[0]
        if path.startswith(EXPORT_ROOT + "."):
            out.append(path[len(EXPORT_ROOT) + 1:])
    return out


def module_outputs(gm: GraphModule) -> dict[str, Node]:
    """For each module of the user's model, the graph node that carries its output out of it (the
    last node inside it with a user outside it), in graph order."""
    out: dict[str, Node] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        paths = _module_paths(node)
        for path in paths:
            if any(u.op == "output" or path not in _module_paths(u) for u in node.users):
                out[path] = node
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return dict(sorted(out.items(), key=lambda kv: index[kv[1]]))


class _Recorder(Interpreter):
    """Runs a graph and keeps the values of some nodes."""

    def __init__(self, gm: GraphModule, keep: set[Node]):
        super().__init__(gm)
        self.keep, self.values = keep, {}

    def run_node(self, n: Node):
        value = super().run_node(n)
        if n in self.keep:
            self.values[n] = value.detach().clone()
        return value


def _diagnose(model, runner, plain_graph, tokens, steps, device, dtype) -> str:
    """'First module whose output differs: ...' (or why it could not be found)."""
    from autodeploy.runtime.runner import GraphRunner

    try:
        gm = plain_graph()
        outputs = module_outputs(gm)
        plain = GraphRunner(gm, runner.sizes, runner.inputs.input_ids.device, "eager")
        recorder = _Recorder(gm, set(outputs.values()))
        recorded: list[dict[Node, torch.Tensor]] = []

        def run(*args):
            recorder.values = {}
            result = recorder.run(*args)
            recorded.append(recorder.values)
            return result

        plain.fn = run
        got = _run_probe(plain, tokens, steps)
    except Exception as e:  # the diagnosis must not hide the mismatch it explains
        return f"(module-level diagnosis failed: {type(e).__name__}: {e}). "
    named = dict(model.named_modules())
    ref, hooked = _reference(model, tokens, device, {p: named[p] for p in outputs if p in named})
    if _compare(steps, got, ref, dtype) is None:
        return ("The same graph without the performance transforms agrees with the model: one of "
                "DeployConfig.perf_transforms changed the numbers (switch them off one by one to find it). ")
    for path, node in outputs.items():
        for index, step in enumerate(steps):
            value, offset = recorded[index].get(node), 0
            for r, start, n in step.lanes:
                expected = hooked[r].get(path)
                if (value is None or expected is None or value.dim() < 2 or expected.dim() != value.dim()
                        or value.shape[0] != 1 or expected.shape[0] != 1 or value.shape[2:] != expected.shape[2:]
                        or expected.shape[1] != len(tokens[r])):
                    break
                for row in range(n):
                    err, tol = _row_error(value[0, offset + row].flatten(), expected[0, start + row].flatten(), dtype)
                    if not err <= tol:
                        module = named.get(path)
                        layer = _layer_of(path)
                        inside = f", inside layer {layer} ({type(named[layer]).__name__})" if layer and layer != path \
                            and layer in named else ""
                        return (f"First module whose output differs: {path} ({type(module).__name__}){inside}, "
                                f"at request {r}, position {start + row} (step {index + 1}). ")
                offset += n
    return "No single module's output could be compared. "


def _layer_of(path: str) -> str:
    """The outermost path prefix that is an element of a module list (``model.layers.3``), else ''."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ""
