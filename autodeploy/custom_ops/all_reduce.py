"""Tensor-parallel all-reduce: ``autodeploy::all_reduce``.

The sum of ``x`` over every rank of the default ``torch.distributed`` process group (NCCL on
GPUs, gloo on the CPU), returned as a fresh contiguous tensor. ``shard_tensor_parallel`` inserts
it after each row-parallel linear, where every rank holds a partial sum of the layer's output.

A registered op with a fake implementation, so graphs that contain it still export, compile
(inductor keeps it opaque) and capture into CUDA graphs (NCCL collectives are capturable).
Every rank must run the same sequence of all-reduces: the engine guarantees that by running the
same deterministic schedule on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce"]


@torch.library.custom_op("autodeploy::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """x: any shape and dtype, the same on every rank. Returns sum over ranks, contiguous."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "autodeploy::all_reduce needs an initialised torch.distributed process group; a tensor-parallel "
            "graph runs under torchrun (see autodeploy.distributed.init)"
        )
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


@all_reduce.register_fake
def _all_reduce_fake(x):
    return x.new_empty(x.shape)
