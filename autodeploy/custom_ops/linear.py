"""``autodeploy::linear``: ``x @ weight.T + bias``, with a small-batch path for decode steps.

A decode step multiplies a handful of rows by every weight of the model once: the cost is reading
the weights. At one row cuBLAS picks tiles (and split-K reductions, a second launch) that leave
10-25 % of the bandwidth unused on an H200; there, on CUDA in bfloat16/float16, the op runs one
Triton GEMV (``triton_gemv.py``). From two rows on cuBLAS measured as fast or faster
(benchmarks/bench_gemv.py), so it is ``torch.nn.functional.linear`` (the oracle), as on the CPU.
The row count is a shape, known on the host in eager mode and fixed per captured CUDA graph, so
the choice costs no synchronisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["linear", "linear_body"]


def _use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.is_cuda and x.numel() == x.shape[-1] > 0 and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and weight.dim() == 2 and weight.stride(-1) == 1)


def linear_body(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What ``autodeploy::linear`` runs; fused ops call it as a plain function (no dispatch)."""
    if _use_gemv(x, weight):
        from autodeploy.custom_ops.triton_gemv import triton_gemv

        return triton_gemv(x, weight, bias)
    return F.linear(x, weight, bias)


@torch.library.custom_op("autodeploy::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; x [..., in], weight [out, in], bias [out] -> [..., out]."""
    return linear_body(x, weight, bias)


@linear.register_fake
def _(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
