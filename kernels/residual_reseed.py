"""``ResidualVQ``'s dead-code re-seeding in one launch (the torch path: about 30 small ops).

One program per (tile of ``BLOCK_K`` codes, codebook): each code's row of the batch
(``picks``, drawn by the module, the same for both backends) is rebuilt as its codebook's
level saw it, ``x - sum of the earlier levels' codes`` (from the codebooks the forward
searched, ``snapshot``); a dead code of an applied codebook takes it (normalised for cosine
codes) at the start size, and its codebook's count goes up. The rule is
``vqfast._torch.residual_vq.residual_reseed``'s.
"""

import itertools

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import PTR, cdiv, check_same_device, launch, launch_config, launcher
from ._launch import streaming_configs
from ._layout import row_offsets, vector_layout

CONFIG = dict(BLOCK_K=16, MAX_BLOCK_D=64, num_warps=4)


@triton.jit
def _level_residual(z_ptr, x_offsets, idx_ptr, snapshot_ptr, rows, slot0, book0, level, N, K,
                    S, d, dims, mask, code_mask):
    """Channels ``dims`` of each row as level ``level`` of its group saw it (fp32)."""
    x = tl.load(z_ptr + x_offsets[:, None] + dims[None, :].to(tl.int64) * S, mask=mask,
                other=0.0).to(tl.float32)
    before = tl.zeros_like(x)
    for earlier in range(0, level):  # summed in level order, as the torch path does
        code = tl.load(idx_ptr + (slot0 + earlier).to(tl.int64) * N + rows, mask=code_mask,
                       other=-1)
        entry = ((book0 + earlier).to(tl.int64) * K + tl.maximum(code, 0))[:, None] * d
        before += tl.load(snapshot_ptr + entry + dims[None, :], mask=mask & (code >= 0)[:, None],
                          other=0.0)
    return x - before


@triton.jit
def _residual_reseed_kernel(
    z_ptr, idx_ptr, snapshot_ptr, picks_ptr, size_ptr, decay_weight_ptr, applied_ptr,
    codebook_ptr, weight_ptr, reseeded_ptr, real_ptr,
    N, S, DZ, K, d, Q, C, applied_stride, threshold, start_scale,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, COSINE: tl.constexpr,
    HAS_REAL: tl.constexpr, STATS_SEM: tl.constexpr,
):
    book = tl.program_id(1)
    group = book // C
    level = book % C  # (a shared codebook, C = 1: its group's first level)
    book64 = book.to(tl.int64)
    codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    code_mask = codes < K
    rows = tl.load(picks_ptr + codes, mask=code_mask, other=0)
    chosen = tl.load(idx_ptr + (group * Q + level).to(tl.int64) * N + rows, mask=code_mask,
                     other=-1)
    size = tl.load(size_ptr + book64 * K + codes, mask=code_mask, other=0.0)
    decay_weight = tl.load(decay_weight_ptr + book)
    applied = tl.load(applied_ptr + book * applied_stride)
    dead = (code_mask & (chosen >= 0) & (size / tl.maximum(decay_weight, 1e-30) < threshold)
            & (tl.zeros_like(size) + applied > 0))
    if HAS_REAL:  # padding rows of a smaller level's codebook never become codes
        dead = dead & (tl.load(real_ptr + book64 * K + codes, mask=code_mask, other=0) != 0)
    tl.atomic_add(reseeded_ptr + book, tl.sum(dead.to(tl.int64), axis=0), sem=STATS_SEM)
    start = start_scale * decay_weight
    tl.store(size_ptr + book64 * K + codes, tl.zeros_like(size) + start, mask=dead)

    x_offsets = row_offsets(rows, S, DZ) + (group * d).to(tl.int64) * S
    slot0, book0 = group * Q, group * C
    code_offsets = (book64 * K + codes.to(tl.int64))[:, None] * d
    scale = tl.full([BLOCK_K], 1.0, tl.float32)
    if COSINE:  # unit vectors: F.normalize's rule, max(|r|, 1e-12)
        sumsq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            mask = dead[:, None] & (dims < d)[None, :]
            r = _level_residual(z_ptr, x_offsets, idx_ptr, snapshot_ptr, rows, slot0, book0,
                                level, N, K, S, d, dims, mask, dead)
            sumsq += tl.sum(r * r, axis=1)
        scale = 1.0 / tl.maximum(tl.sqrt(sumsq), 1e-12)
    for d0 in range(0, d, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = dead[:, None] & (dims < d)[None, :]
        r = _level_residual(z_ptr, x_offsets, idx_ptr, snapshot_ptr, rows, slot0, book0, level,
                            N, K, S, d, dims, mask, dead) * scale[:, None]
        tl.store(codebook_ptr + code_offsets + dims[None, :], r, mask=mask)
        tl.store(weight_ptr + code_offsets + dims[None, :], r * start, mask=mask)


@launcher
def residual_reseed(z, idx, snapshot, picks, size, decay_weight, applied, codebooks, ema_weight,
                    reseeded, real_codes, threshold, groups, num_levels, shared, cosine):
    """See ``vqfast._torch.residual_vq.residual_reseed`` (the same rule, one launch)."""
    n, dz, s = vector_layout("z", z)
    books, k, d = codebooks.shape
    check_same_device(z=z, idx=idx, snapshot=snapshot, picks=picks, size=size,
                      codebooks=codebooks)
    per_group = 1 if shared else num_levels
    if (dz != groups * d or books != groups * per_group or idx.shape != (groups * num_levels, n)
            or snapshot.shape != codebooks.shape or picks.shape != (k,)
            or size.shape != (books, k) or ema_weight.shape != codebooks.shape
            or decay_weight.shape != (books,) or applied.shape != (books,)
            or reseeded.shape != (books,)):
        raise ValueError(f"residual_reseed: shapes disagree (z {tuple(z.shape)}, idx "
                         f"{tuple(idx.shape)}, codebooks {tuple(codebooks.shape)}, groups "
                         f"{groups}, levels {num_levels})")
    fp32, i64 = torch.float32, torch.int64
    for name, t, dtype in (("idx", idx, i64), ("snapshot", snapshot, fp32), ("picks", picks, i64),
                           ("size", size, fp32), ("codebooks", codebooks, fp32),
                           ("ema_weight", ema_weight, fp32), ("decay_weight", decay_weight, fp32),
                           ("applied", applied, fp32), ("reseeded", reseeded, i64)):
        if t.dtype != dtype or (name != "applied" and not t.is_contiguous()):
            raise ValueError(f"residual_reseed: {name} must be a contiguous {dtype}, got "
                             f"{t.dtype}")
    if real_codes is not None and (real_codes.shape != (books, k) or real_codes.dtype != torch.bool
                                   or not real_codes.is_contiguous()):
        raise ValueError(f"residual_reseed: real_codes must be a contiguous bool [{books}, {k}]")
    config = launch_config(CONFIG, d)
    launch(_residual_reseed_kernel, (cdiv(k, config["BLOCK_K"]), books),
           z, idx, snapshot, picks, size, decay_weight, applied, codebooks, ema_weight, reseeded,
           real_codes if real_codes is not None else size, n, s, dz, k, d, num_levels,
           per_group, applied.stride(0), float(threshold), max(float(threshold), 1.0),
           COSINE=bool(cosine), HAS_REAL=real_codes is not None, STATS_SEM=_launch.STATS_SEM,
           **config)


def aot_variants():
    for dtype, (consts, options), cosine, real in itertools.product(
            PTR, streaming_configs(CONFIG), (False, True), (False, True)):
        sig = {"z_ptr": PTR[dtype], "idx_ptr": "*i64", "snapshot_ptr": "*fp32",
               "picks_ptr": "*i64", "size_ptr": "*fp32", "decay_weight_ptr": "*fp32",
               "applied_ptr": "*fp32", "codebook_ptr": "*fp32", "weight_ptr": "*fp32",
               "reseeded_ptr": "*i64", "real_ptr": "*i1" if real else "*fp32",
               "N": "i32", "S": "i32", "DZ": "i32", "K": "i32", "d": "i32", "Q": "i32",
               "C": "i32", "applied_stride": "i32", "threshold": "fp32", "start_scale": "fp32"}
        yield (f"residual_reseed[{dtype},D{consts['BLOCK_D']},cosine={cosine},real={real}]",
               _residual_reseed_kernel, sig,
               dict(consts, COSINE=cosine, HAS_REAL=real, STATS_SEM=_launch.STATS_SEM), options)
