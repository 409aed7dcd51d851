"""Triton kernel for ``autodeploy::prepare_logit_rows`` on the GPU: one launch instead of the ~20
small torch ops the reference takes (a decode step's kernels are its cost at small batch).

One program walks the lanes in order, keeping the running token offset and row count, and writes
each lane's returned rows (its last token, or all tokens of a verify lane); the rows past the
used ones are padding and are set to 0 afterwards (disjoint addresses: no ordering needed between
the program's threads), as in the torch implementation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autodeploy.custom_ops.triton_pdl import pdl_launch, pdl_wait

__all__ = ["triton_logit_rows"]


@triton.jit
def _logit_rows_kernel(seq_lens_ptr, verify_ptr, rows_ptr, num_lanes, num_rows, BLOCK: tl.constexpr,
                       PDL: tl.constexpr = False):
    pdl_wait(PDL)
    offs = tl.arange(0, BLOCK)
    token = tl.full([], 0, tl.int64)  # int64 from the start: the loop adds int64 lengths (the
    row = tl.full([], 0, tl.int64)    # GPU compiler rejects a loop-carried type change)
    for lane in range(0, num_lanes):
        n = tl.load(seq_lens_ptr + lane).to(tl.int64)
        verify = tl.load(verify_ptr + lane) != 0
        used = tl.where(verify, n, tl.where(n > 0, 1, 0))
        for j in range(0, used, BLOCK):  # the lane's last `used` tokens, while rows remain
            k = j + offs
            tl.store(rows_ptr + row + k, token + n - used + k, mask=(k < used) & (row + k < num_rows))
        token += n
        row += used
    for first in range(row, num_rows, BLOCK):  # padding rows (disjoint from the above) point at row 0
        tl.store(rows_ptr + first + offs, tl.zeros([BLOCK], tl.int64), mask=first + offs < num_rows)


def triton_logit_rows(seq_lens: torch.Tensor, verify: torch.Tensor, num_rows: int) -> torch.Tensor:
    rows = torch.empty(num_rows, dtype=torch.int64, device=seq_lens.device)
    if num_rows:
        _logit_rows_kernel[(1,)](seq_lens, verify.view(torch.uint8) if verify.dtype == torch.bool else verify, rows,
                                 seq_lens.shape[0], num_rows, BLOCK=64, **pdl_launch(seq_lens.device))
    return rows
