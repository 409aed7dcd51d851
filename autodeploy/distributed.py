"""torch.distributed glue for tensor parallelism: one process per rank, launched by torchrun.

    torchrun --nproc-per-node 2 my_script.py        # every rank runs the same script

``init`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), starts
the default process group (NCCL for CUDA devices, gloo for the CPU) and pins each rank to
``cuda:LOCAL_RANK``. Every rank then builds the same model, exports it, shards its own slice
(``shard_tensor_parallel``) and runs the same deterministic engine schedule; the graph's
``autodeploy::all_reduce`` ops are the only communication inside a step. What must agree across
ranks is checked or made to agree here: the weights (a fingerprint is compared, ``check_same_weights``)
and the requests (rank 0's prompts and sampling parameters are broadcast, ``broadcast_object``).
"""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_world_size() -> int:
    """WORLD_SIZE of the torchrun launch this process belongs to (1 when not launched so)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def backend_for(device: str | torch.device) -> str:
    """The collective backend for ``device``: NCCL for CUDA tensors, with gloo beside it for the
    host tensors a rank exchanges while it builds on the host (weight fingerprints, requests);
    gloo alone on the CPU."""
    return "cpu:gloo,cuda:nccl" if str(device).startswith("cuda") else "gloo"


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def init(tensor_parallel_size: int, device: str) -> str:
    """Join (or start) the default process group of ``tensor_parallel_size`` ranks; returns the
    device this rank runs on (``cuda:LOCAL_RANK`` for a CUDA device, else ``device``).

    Raises ValueError when the process was not launched by torchrun with that many processes."""
    if not dist.is_available():
        raise ValueError("tensor parallelism needs torch.distributed, which this torch build lacks")
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing and not is_initialized():
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} needs one process per rank: launch with "
            f"'torchrun --nproc-per-node {tensor_parallel_size} script.py' or 'autodeploy run --tp "
            f"{tensor_parallel_size} ...' (torchrun variable(s) {', '.join(missing)} not set)")
    size = dist.get_world_size() if is_initialized() else launched_world_size()
    if size != tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} but this launch has {size} processes "
                         f"(WORLD_SIZE); start {tensor_parallel_size} (torchrun --nproc-per-node "
                         f"{tensor_parallel_size}), or leave tensor_parallel_size unset to use them all")
    if str(device).startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not is_initialized():  # a group the caller started is used as it is
        dist.init_process_group(backend=backend_for(device))
        atexit.register(_destroy)
    return device


def _destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (pickled; for small host objects)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def check_same_weights(model: nn.Module) -> None:
    """Raise ValueError, on every rank, naming the first parameter or buffer whose values differ
    between ranks (a model built with different seeds would otherwise give wrong tokens)."""
    names, sums = [], []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        t = torch.view_as_real(t) if t.is_complex() else t
        names.append(name)
        sums.append(torch.nan_to_num(t.detach().double()).sum())
    if not sums:
        return
    mine = torch.stack(sums)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    for other_rank, theirs in enumerate(everyone):
        differs = (theirs != mine).nonzero()
        if len(differs):
            name = names[int(differs[0])]
            raise ValueError(f"the weights differ between ranks {rank()} and {other_rank} (first: {name!r}); every "
                             "rank must build or load the same model (seed random initialisation identically)")
