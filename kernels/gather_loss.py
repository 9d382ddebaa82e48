"""Fused gather + losses (+ EMA statistics): one pass over x.

Per row: ``q = codebook[idx]`` stored in x's dtype, the exact ``sum((q - x)^2)`` in fp32
(not the expanded form, which cancels badly), the code's count (integer atomics, so
exact and deterministic) and, for the EMA quantizer, the row added into its code's sum.
The last program to finish (an atomic ticket) reduces the per-program squared errors in
a fixed order into the scaled loss and the counts into the perplexity: no extra launches,
and bitwise reproducible.
"""

import itertools

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import (launch, cdiv, launcher, PTR, check_codebook, check_rows, check_same_device, launch_config,
                      streaming_configs)
from ._layout import check_item_offsets, row_offsets, vector_layout
from .code_sums import code_sums_sorted

CONFIG = dict(BLOCK_N=32, MAX_BLOCK_D=64, num_warps=8)
BLOCK_REDUCE = 512  # the last program's reduction width


@triton.jit
def _gather_loss_kernel(
    x_ptr, codebook_ptr, idx_ptr, q_ptr, partial_err_ptr, counts_ptr, code_sums_ptr,
    ticket_ptr, loss_ptr, perplexity_ptr, usage_ptr, usage_weight_ptr, seed_ptr,
    N, D, S, K, loss_scale, usage_decay,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_REDUCE: tl.constexpr,
    ATOMIC_CODE_SUMS: tl.constexpr, STATS_SEM: tl.constexpr, TRACK_USAGE: tl.constexpr,
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
            tl.atomic_add(code_sums_ptr + code_offsets + dims[None, :], x, mask=mask, sem=STATS_SEM)

    tl.store(partial_err_ptr + pid, tl.sum(err, axis=0))
    tl.atomic_add(counts_ptr + codes, tl.full([BLOCK_N], 1, dtype=tl.int32), mask=row_mask,
                  sem=STATS_SEM)
    # The hand-off. The barrier: every warp's partial and counts are issued before the one
    # thread that takes the ticket releases them (triton adds none for atomics before 3.9).
    # Release: they are visible before the ticket; the last program's acquire makes every
    # program's visible to it (loads bypass L1: .cg).
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        lanes = tl.arange(0, BLOCK_REDUCE)
        total = tl.zeros([BLOCK_REDUCE], dtype=tl.float32)
        for i in range(0, tl.num_programs(0), BLOCK_REDUCE):
            total += tl.load(partial_err_ptr + i + lanes, mask=i + lanes < tl.num_programs(0),
                             other=0.0, cache_modifier=".cg")
        tl.store(loss_ptr, tl.sum(total, axis=0) * loss_scale)
        # perplexity = exp(-sum p log(p + 1e-10)), p = counts / N (the original's formula)
        entropy = tl.zeros([BLOCK_REDUCE], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_REDUCE):
            count = tl.load(counts_ptr + k0 + lanes, mask=k0 + lanes < K, other=0,
                            cache_modifier=".cg")
            p = count.to(tl.float32) / N
            entropy += p * tl.log(p + 1e-10)
            if TRACK_USAGE:  # the usage EMA of a learned codebook (for its dead-code rule)
                usage_mask = k0 + lanes < K
                usage = tl.load(usage_ptr + k0 + lanes, mask=usage_mask, other=0.0)
                usage = usage * usage_decay + (1.0 - usage_decay) * count.to(tl.float32)
                tl.store(usage_ptr + k0 + lanes, usage, mask=usage_mask)
        tl.store(perplexity_ptr, tl.exp(-tl.sum(entropy, axis=0)))
        if TRACK_USAGE:  # ... its bias correction, and the next re-seeding's Philox key
            weight = tl.load(usage_weight_ptr)
            tl.store(usage_weight_ptr, weight * usage_decay + (1.0 - usage_decay))
            tl.store(seed_ptr, tl.load(seed_ptr) + 1)


@launcher
def gather_loss(x: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor, with_code_sums: bool,
                loss_scale: float = 1.0, code_sums: torch.Tensor | None = None,
                counts: torch.Tensor | None = None, usage=None):
    """``x: [N, D]`` or ``[B, D, S]``, ``codebook: [K, D]``, ``idx: int64 [N]`` ->
    ``q`` (x's shape and dtype), ``loss`` (fp32 0-d: ``loss_scale * sum((q - x)^2)``),
    ``perplexity`` (fp32 0-d), ``counts`` (int32 [K]), ``code_sums`` (fp32 [K, D], the
    per-code sums of x; ``None`` unless ``with_code_sums``), accumulated into ``code_sums``
    and ``counts`` (int32 ``[K + 1]``: the counts and the programs' ticket) if given, zeroed
    already (``nearest_code(..., zero=)`` does it in its codebook pass).

    ``usage = (size, decay_weight, seed, decay)``, if given, also moves a learned codebook's
    usage EMA (fp32 ``size [K]`` and 0-d ``decay_weight``) by this batch's counts and
    advances the re-seeding key (int64 ``seed [1]``), in the same launch.

    Under ``torch.are_deterministic_algorithms_enabled()`` the code sums come from the
    sort-based kernel instead of fp32 atomics, so they are bitwise reproducible.
    """
    n, d, s = vector_layout("x", x)
    check_item_offsets("x", d, s)
    check_codebook(codebook, d)
    check_same_device(x=x, codebook=codebook, idx=idx)
    k = codebook.shape[0]
    check_rows("idx", idx, n, torch.int64)
    config = launch_config(CONFIG, d)
    grid = (cdiv(n, config["BLOCK_N"]),)
    q = torch.empty_like(x)
    partial_err = torch.empty(grid[0], dtype=torch.float32, device=x.device)
    counts_and_ticket = (counts if counts is not None
                         else torch.zeros(k + 1, dtype=torch.int32, device=x.device))
    if counts_and_ticket.shape != (k + 1,) or counts_and_ticket.dtype != torch.int32:
        raise ValueError(f"counts must be int32 [{k + 1}], got {counts_and_ticket.dtype} "
                         f"{tuple(counts_and_ticket.shape)}")
    loss = torch.empty((), dtype=torch.float32, device=x.device)
    perplexity = torch.empty((), dtype=torch.float32, device=x.device)
    atomic = with_code_sums and not torch.are_deterministic_algorithms_enabled()
    if not atomic:
        code_sums = None
    elif code_sums is None:
        code_sums = torch.zeros(k, d, dtype=torch.float32, device=x.device)
    launch(_gather_loss_kernel, grid,
        x, codebook, idx, q, partial_err, counts_and_ticket,
        code_sums if atomic else counts_and_ticket, counts_and_ticket[k:], loss, perplexity,
        *(usage[:3] if usage is not None else (loss, loss, loss)),
        n, d, s, k, float(loss_scale), float(usage[3]) if usage is not None else 0.0,
        BLOCK_REDUCE=BLOCK_REDUCE, ATOMIC_CODE_SUMS=atomic,
        STATS_SEM=_launch.STATS_SEM, TRACK_USAGE=usage is not None, **config)
    if with_code_sums and not atomic:
        code_sums = code_sums_sorted(x, idx, k)
    return q, loss, perplexity, counts_and_ticket[:k], code_sums


def aot_variants():
    """Every launchable configuration, for the ahead-of-time compile test."""
    for dtype, (cfg, options), (atomic, usage) in itertools.product(
            PTR, streaming_configs(CONFIG), ((True, False), (False, False), (False, True))):
        sig = {"x_ptr": PTR[dtype], "codebook_ptr": "*fp32", "idx_ptr": "*i64", "q_ptr": PTR[dtype],
               "partial_err_ptr": "*fp32", "counts_ptr": "*i32",
               "code_sums_ptr": "*fp32" if atomic else "*i32", "ticket_ptr": "*i32",
               "loss_ptr": "*fp32", "perplexity_ptr": "*fp32", "usage_ptr": "*fp32",
               "usage_weight_ptr": "*fp32", "seed_ptr": "*i64" if usage else "*fp32",
               "N": "i32", "D": "i32", "S": "i32", "K": "i32", "loss_scale": "fp32",
               "usage_decay": "fp32"}
        yield (f"gather_loss[{dtype},D{cfg['BLOCK_D']},atomic={atomic},usage={usage}]",
               _gather_loss_kernel, sig,
               dict(cfg, BLOCK_REDUCE=BLOCK_REDUCE, ATOMIC_CODE_SUMS=atomic,
                    STATS_SEM=_launch.STATS_SEM, TRACK_USAGE=usage), options)
