"""``torch.compile(model, backend="autodeploy")``: autodeploy's op matching as a dynamo backend.

For every subgraph dynamo captures, the backend

1. traces it to a pre-dispatch aten graph (``make_fx(pre_dispatch=True)`` under dynamo's fake
   mode, node metadata preserved): the IR ``match_attention`` is written for, with SDPA,
   ``matmul`` and ``softmax`` still whole;
2. runs attention matching on it, so SDPA and eager matmul/softmax attention become
   ``autodeploy::attention`` (masks are probed as in ``match_attention``, see :class:`_DynamoMaskProbe`
   for dynamic shapes and for masks that read graph inputs);
3. swaps every canonical op for the fastest *uncached* implementation available: attention ->
   ``F.scaled_dot_product_attention`` (causal, or with an explicit sliding-window mask; GQA via
   ``enable_gqa``), the op's torch reference where SDPA cannot express it (soft-cap, sinks);
   ``ssd_scan`` / ``causal_conv1d`` -> autodeploy's Triton kernels on CUDA (run as one-shot cached
   calls on scratch state), the torch references otherwise;
4. hands the graph to inductor (option ``inductor``, default on) or runs it as is.

Mamba2 mixers: dynamo traces transformers' torch fallback (no mamba_ssm), i.e. inlined aten ops
that nothing matches. :func:`prepare` routes the model's Mamba2 kernel entry points into
``autodeploy::ssd_scan`` / ``causal_conv1d`` while it runs (``export.route_mamba_entry_points``,
entered around every call, outside the compiled frame), so dynamo captures the canonical ops.

Every compiled subgraph is logged (logger ``autodeploy.dynamo``) and recorded in :data:`STATS`;
several subgraphs for one forward mean graph breaks (``torch._dynamo.explain`` names them).

Options (``torch.compile(..., options={...})``): ``inductor`` (bool, default True; on the CPU a
failing inductor compile falls back to eager with a warning unless ``inductor=True`` was given),
``match_attention`` (bool, default True), ``ssm_backend`` ("auto" | "torch" | "triton" |
"flashinfer", the last meaning the Triton kernels here; see ``autodeploy.backends``),
``probe_length`` (int, default 4096: masks of dynamic-length graphs are probed at the larger of it
and the current length rounded up to a power of two; a guard ``seq_len <= that length``
recompiles beyond it),
``inductor_config`` (dict of inductor config patches).
"""

from __future__ import annotations

from autodeploy.dynamo_backend.backend import autodeploy_backend, register
from autodeploy.dynamo_backend.ops import sdpa_attention, torch_ssd_scan, triton_causal_conv1d, triton_ssd_scan
from autodeploy.dynamo_backend.records import DEFAULT_OPTIONS, STATS, GraphRecord
from autodeploy.dynamo_backend.routing import prepare, unprepare

__all__ = ["autodeploy_backend", "prepare", "unprepare", "STATS", "GraphRecord", "DEFAULT_OPTIONS", "register",
           "sdpa_attention", "triton_ssd_scan", "triton_causal_conv1d", "torch_ssd_scan"]

register()
