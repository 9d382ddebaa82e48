"""Fused gather + losses (+ EMA statistics): one pass over x.

Per row: ``q = codebook[idx]`` stored in x's dtype, the exact ``sum((q - x)^2)`` in fp32
(not the expanded form, which cancels badly), the code's count (integer atomics, so
exact and deterministic) and, for the EMA quantizer, the row added into its code's sum.
The squared error is reduced per program and summed once on the host side of the graph.
"""

import itertools

import torch
import triton
import triton.language as tl

from ._checks import (PTR, check_codebook, check_rows, check_same_device, launch_config,
                      streaming_configs)
from ._layout import row_offsets, vector_layout
from .code_sums import code_sums_sorted

CONFIG = dict(BLOCK_N=32, MAX_BLOCK_D=64, num_warps=8)


@triton.jit
def _gather_loss_kernel(
    x_ptr, codebook_ptr, idx_ptr, q_ptr, partial_err_ptr, counts_ptr, code_sums_ptr,
    N, D, S,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ATOMIC_CODE_SUMS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    codes = tl.load(idx_ptr + rows, mask=row_mask, other=0)
    vector_offsets = row_offsets(rows, S, D)[:, None]
    code_offsets = codes[:, None] * D

    err = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (dims[None, :] < D)
        offsets = vector_offsets + dims[None, :] * S
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        q = tl.load(codebook_ptr + code_offsets + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(q_ptr + offsets, q.to(q_ptr.dtype.element_ty), mask=mask)
        diff = q - x
        err += tl.sum(diff * diff, axis=1)
        if ATOMIC_CODE_SUMS:
            tl.atomic_add(code_sums_ptr + code_offsets + dims[None, :], x, mask=mask)

    tl.store(partial_err_ptr + pid, tl.sum(err, axis=0))
    tl.atomic_add(counts_ptr + codes, tl.full([BLOCK_N], 1, dtype=tl.int32), mask=row_mask)


def gather_loss(x: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor, with_code_sums: bool):
    """``x: [N, D]`` or ``[B, D, S]``, ``codebook: [K, D]``, ``idx: int64 [N]`` ->
    ``q`` (x's shape and dtype), ``sq_err`` (fp32 0-d), ``counts`` (int32 [K]),
    ``code_sums`` (fp32 [K, D], the per-code sums of x; ``None`` unless ``with_code_sums``).

    Under ``torch.are_deterministic_algorithms_enabled()`` the code sums come from the
    sort-based kernel instead of fp32 atomics, so they are bitwise reproducible.
    """
    n, d, s = vector_layout("x", x)
    check_codebook(codebook, d)
    check_same_device(x=x, codebook=codebook, idx=idx)
    k = codebook.shape[0]
    check_rows("idx", idx, n, torch.int64)
    config = launch_config(CONFIG, d)
    grid = (triton.cdiv(n, config["BLOCK_N"]),)
    q = torch.empty_like(x)
    partial_err = torch.empty(grid[0], dtype=torch.float32, device=x.device)
    counts = torch.zeros(k, dtype=torch.int32, device=x.device)
    atomic = with_code_sums and not torch.are_deterministic_algorithms_enabled()
    code_sums = torch.zeros(k, d, dtype=torch.float32, device=x.device) if atomic else None
    _gather_loss_kernel[grid](
        x, codebook, idx, q, partial_err, counts, code_sums if atomic else counts, n, d, s,
        ATOMIC_CODE_SUMS=atomic, **config)
    if with_code_sums and not atomic:
        code_sums = code_sums_sorted(x, idx, k)
    return q, partial_err.sum(), counts, code_sums


def aot_variants():
    """Every launchable configuration, for the ahead-of-time compile test."""
    for dtype, (cfg, options), atomic in itertools.product(PTR, streaming_configs(CONFIG),
                                                            (True, False)):
        sig = {"x_ptr": PTR[dtype], "codebook_ptr": "*fp32", "idx_ptr": "*i64", "q_ptr": PTR[dtype],
               "partial_err_ptr": "*fp32", "counts_ptr": "*i32",
               "code_sums_ptr": "*fp32" if atomic else "*i32", "N": "i32", "D": "i32", "S": "i32"}
        yield (f"gather_loss[{dtype},D{cfg['BLOCK_D']},atomic={atomic}]", _gather_loss_kernel,
               sig, dict(cfg, ATOMIC_CODE_SUMS=atomic), options)
