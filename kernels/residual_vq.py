"""Fused residual / grouped VQ: every level of every group in one forward launch, one
backward launch.

One program per (tile of ``BLOCK_N`` rows, group), for all the levels. Per level: the
streamed nearest-code search of ``nearest_code`` (``tl.dot`` tiles over the level's
codebook, channel chunks, running argmin: never ``[N, K]``) with the residual
``r = x - total`` as its input, then the level's epilogue: the chosen codes gathered in
fp32, the exact squared error, the counts and per-code sums of the EMA update (fp32
atomics) and ``total += code``. ``total``, the running sum of codes, lives in an fp32
scratch that only this program touches (L1/L2-resident: it is re-read right after it is
written), so any group width works at the search's register budget. The output (the sum
of the codes) is written once at the end. The backward walks the levels again from the
codes: the commitment gradient of every level (through the normalisation for cosine
codes), the codebook gradients, and the rotation trick, in the same pass.
"""

import itertools

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import (launch, launcher, PTR, TORCH_DTYPES, check_same_device, launch_config, split_options,
                      streaming_configs)
from ._layout import row_offsets, vector_layout
from .code_sums import code_sums_sorted
from .nearest_code import PRECISIONS, codebook_prep, codes_transposed, pick_config, running_argmin
from ..reference.residual import ROTATION_MIN_NORM_RATIO

# Launch configurations, compiled for sm_80 / sm_90 with triton 3.6 and 3.9 by the AOT
# test (zero spills). The forward's search walks channel chunks of 16 as nearest_code's
# does, with tiles a notch smaller (the level's epilogue shares its registers); the
# backward is elementwise, in channel chunks too.
FORWARD_CONFIGS = {
    "16bit": dict(BLOCK_N=64, BLOCK_K=128, BLOCK_D=16, num_warps=8, num_stages=3),
    "tf32": dict(BLOCK_N=64, BLOCK_K=64, BLOCK_D=16, num_warps=8, num_stages=2),
    "ieee": dict(BLOCK_N=64, BLOCK_K=64, BLOCK_D=16, num_warps=8, num_stages=1),
}
BACKWARD_CONFIG = dict(BLOCK_N=16, MAX_BLOCK_D=32, num_warps=4)
# A cosine search keeps each row's scale live through the level: at 8 warps ptxas caps the
# fp32 FFMA variant at 128 registers on sm_80 and spills 8 B; at 4 warps it does not.
COSINE_IEEE = dict(num_warps=4)
# What happens to each level's (normalised) residuals for the EMA sums / codebook grads.
NO_SUMS, ATOMIC_SUMS, STORE_RESIDUALS = 0, 1, 2


@triton.jit
def _chunk(ptr, offsets, mask):
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _residual_chunk(x_ptr, total_ptr, x_rows, total_rows, dims, mask, S):
    """Channels ``dims`` of the rows' residual ``x - total`` (fp32)."""
    return (_chunk(x_ptr, x_rows + dims[None, :].to(tl.int64) * S, mask)
            - _chunk(total_ptr, total_rows + dims[None, :], mask))


@triton.jit
def _total_and_residual(x_ptr, total_ptr, x_rows, total_rows, dims, mask, S):
    """Channels ``dims`` of the rows' running sum of codes ``total`` and of ``x - total``."""
    total = _chunk(total_ptr, total_rows + dims[None, :], mask)
    return total, _chunk(x_ptr, x_rows + dims[None, :].to(tl.int64) * S, mask) - total


@triton.jit
def _residual_scale(x_ptr, total_ptr, x_rows, total_rows, row_mask, S, d,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, COSINE: tl.constexpr):
    """Per row, what the residual is multiplied by before the search: ``1 / max(|r|, 1e-12)``
    when ``COSINE`` (``F.normalize``), else 1."""
    if COSINE:
        sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (dims < d)[None, :]
            r = _residual_chunk(x_ptr, total_ptr, x_rows, total_rows, dims, mask, S)
            sq += tl.sum(r * r, axis=1)
        return 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)
    return tl.full([BLOCK_N], 1.0, dtype=tl.float32)


@triton.jit
def _residual_forward_kernel(
    x_ptr, codebooks_ptr, cast_ptr, sqnorm_ptr, mask_ptr, active_ptr, total_ptr,
    q_ptr, idx_ptr, partial_err_ptr, counts_ptr, code_sums_ptr, residuals_ptr,
    N, D, S, K, d, num_levels, books_per_group,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    COSINE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ACTIVE: tl.constexpr,
    SUMS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    STATS_SEM: tl.constexpr,
):
    tile = tl.program_id(0)
    group = tl.program_id(1)
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    valid = row_mask
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + rows, mask=row_mask, other=0) != 0)
    levels = num_levels
    if HAS_ACTIVE:  # quantize dropout: the first `active` levels run
        levels = tl.minimum(tl.load(active_ptr).to(tl.int32), num_levels)
    num_slots = tl.num_programs(1) * num_levels
    # x: channel c of a row at x_rows + c * S; the running sum of codes (fp32, this
    # program's own rows of `total`, an L1/L2-resident scratch): at total_rows + c.
    x_rows = (row_offsets(rows, S, D) + (group * d).to(tl.int64) * S)[:, None]
    total_rows = (rows.to(tl.int64) * D + group * d)[:, None]
    for d0 in range(0, d, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        tl.store(total_ptr + total_rows + dims[None, :],
                 tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32),
                 mask=row_mask[:, None] & (dims < d)[None, :])
    tl.debug_barrier()

    local_codes = tl.arange(0, BLOCK_K)
    for level in range(0, levels):
        slot = group * num_levels + level
        book = group * books_per_group + level % books_per_group
        book_base = book.to(tl.int64) * K * d
        scale = _residual_scale(x_ptr, total_ptr, x_rows, total_rows, row_mask, S, d,
                                BLOCK_N, BLOCK_D, COSINE)
        # The search: nearest_code's loop, its x tile being the residual r = x - total.
        best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
        best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            code_mask = k0 + local_codes < K
            dot = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for d0 in range(0, d, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                mask = row_mask[:, None] & (dims < d)[None, :]
                r = (_chunk(x_ptr, x_rows + dims[None, :].to(tl.int64) * S, mask)
                     - _chunk(total_ptr, total_rows + dims[None, :], mask)) * scale[:, None]
                codes_t = codes_transposed(cast_ptr + book_base + k0 * d, local_codes, dims,
                                           code_mask, d, UPCAST_DOT)
                if not UPCAST_DOT:
                    r = r.to(cast_ptr.dtype.element_ty)
                dot = tl.dot(r, codes_t, dot, input_precision=INPUT_PRECISION)
            sqnorm = tl.load(sqnorm_ptr + book * K + k0 + local_codes, mask=code_mask,
                             other=float("inf"))
            best, best_idx = running_argmin(dot, sqnorm, k0, best, best_idx)
        # The level's epilogue, chunk by chunk: error, EMA statistics, total += code.
        err = tl.zeros([BLOCK_N], dtype=tl.float32)
        code_rows = book_base + best_idx.to(tl.int64)[:, None] * d
        for d0 in range(0, d, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (dims < d)[None, :]
            level_mask = mask & valid[:, None]
            total, r_used = _total_and_residual(x_ptr, total_ptr, x_rows, total_rows, dims,
                                                mask, S)
            if COSINE == 1:  # (2: a cosine search of raw residuals and codes)
                r_used = r_used * scale[:, None]
            code = _chunk(codebooks_ptr, code_rows + dims[None, :], level_mask)
            diff = tl.where(level_mask, code - r_used, 0.0)
            err += tl.sum(diff * diff, axis=1)
            if SUMS == 1:
                tl.atomic_add(code_sums_ptr + slot.to(tl.int64) * K * d + best_idx[:, None] * d
                              + dims[None, :], r_used, mask=level_mask, sem=STATS_SEM)
            if SUMS == 2:  # the deterministic path sums them sorted by code
                tl.store(residuals_ptr + (slot.to(tl.int64) * N + rows)[:, None] * d
                         + dims[None, :], r_used, mask=mask)
            tl.store(total_ptr + total_rows + dims[None, :], total + code, mask=mask)
        tl.debug_barrier()  # the next level reads `total` in the search's layout
        tl.store(partial_err_ptr + tile * num_slots + slot, tl.sum(err, axis=0))
        tl.store(idx_ptr + slot.to(tl.int64) * N + rows, tl.where(valid, best_idx, -1).to(tl.int64),
                 mask=row_mask)
        tl.atomic_add(counts_ptr + slot * K + best_idx, tl.full([BLOCK_N], 1, dtype=tl.int32),
                      mask=valid, sem=STATS_SEM)
    for level in range(levels, num_levels):  # dropped levels: code -1, no error
        slot = group * num_levels + level
        tl.store(partial_err_ptr + tile * num_slots + slot, 0.0)
        tl.store(idx_ptr + slot.to(tl.int64) * N + rows, tl.full([BLOCK_N], -1, tl.int64),
                 mask=row_mask)
    for d0 in range(0, d, BLOCK_D):  # out: the sum of the codes, the input where masked
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (dims < d)[None, :]
        out = tl.where(valid[:, None], _chunk(total_ptr, total_rows + dims[None, :], mask),
                       _chunk(x_ptr, x_rows + dims[None, :].to(tl.int64) * S, mask))
        tl.store(q_ptr + x_rows + dims[None, :].to(tl.int64) * S,
                 out.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_backward_kernel(
    grad_q_ptr, x_ptr, codebooks_ptr, idx_ptr, grad_scale_ptr, grad_x_ptr, grad_codebooks_ptr,
    residuals_ptr, total_ptr, commit_ptr, N, D, S, K, d, num_levels, books_per_group,
    commit_levels, x_scale, codebook_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, COSINE: tl.constexpr,
    ROTATION: tl.constexpr, GRADS: tl.constexpr, STATS_SEM: tl.constexpr,
    MIN_NORM_RATIO: tl.constexpr,
):
    group = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    x_rows = (row_offsets(rows, S, D) + (group * d).to(tl.int64) * S)[:, None]
    total_rows = (rows.to(tl.int64) * D + group * d)[:, None]  # total and commit scratch
    grad_scale = tl.load(grad_scale_ptr)
    for d0 in range(0, d, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (dims < d)[None, :]
        zero = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        tl.store(total_ptr + total_rows + dims[None, :], zero, mask=mask)
        tl.store(commit_ptr + total_rows + dims[None, :], zero, mask=mask)
    tl.debug_barrier()
    for level in range(0, num_levels):
        slot = group * num_levels + level
        book = group * books_per_group + level % books_per_group
        codes = tl.load(idx_ptr + slot.to(tl.int64) * N + rows, mask=row_mask, other=-1)
        used = codes >= 0
        code_rows = book.to(tl.int64) * K * d + tl.maximum(codes, 0).to(tl.int64)[:, None] * d
        if COSINE:  # through the normalisation: d|r^ - q|^2/2 / dr = (r^ (r^.q) - q) / |r|
            sq = tl.zeros([BLOCK_N], dtype=tl.float32)
            rq = tl.zeros([BLOCK_N], dtype=tl.float32)
            for d0 in range(0, d, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                mask = row_mask[:, None] & (dims < d)[None, :]
                r = _residual_chunk(x_ptr, total_ptr, x_rows, total_rows, dims, mask, S)
                code = _chunk(codebooks_ptr, code_rows + dims[None, :], mask & used[:, None])
                sq += tl.sum(r * r, axis=1)
                rq += tl.sum(r * code, axis=1)
            inv_norm = 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)
            r_hat_q = rq * inv_norm  # r^.q
        for d0 in range(0, d, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (dims < d)[None, :]
            level_mask = mask & used[:, None]
            total, r = _total_and_residual(x_ptr, total_ptr, x_rows, total_rows, dims, mask, S)
            code = _chunk(codebooks_ptr, code_rows + dims[None, :], level_mask)
            if COSINE:
                r_used = r * inv_norm[:, None]
                step = (r_used * r_hat_q[:, None] - code) * inv_norm[:, None]
            else:
                r_used = r
                step = r - code
            commit = _chunk(commit_ptr, total_rows + dims[None, :], mask)
            tl.store(commit_ptr + total_rows + dims[None, :],
                     commit + tl.where(level_mask & (level < commit_levels), step, 0.0),
                     mask=mask)
            tl.store(total_ptr + total_rows + dims[None, :], total + code, mask=mask)
            if GRADS == 1:
                tl.atomic_add(grad_codebooks_ptr + code_rows + dims[None, :],
                              (grad_scale * codebook_scale) * (code - r_used), mask=level_mask,
                              sem=STATS_SEM)
            if GRADS == 2:
                tl.store(residuals_ptr + (slot.to(tl.int64) * N + rows)[:, None] * d
                         + dims[None, :], r_used, mask=mask)
        tl.debug_barrier()
    if ROTATION:  # lambda R^T g, R the rotation of e^ = x^ onto q^, lambda = |q| / |e|
        ee = tl.zeros([BLOCK_N], dtype=tl.float32)
        qq = tl.zeros([BLOCK_N], dtype=tl.float32)
        qg = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (dims < d)[None, :]
            e = _chunk(x_ptr, x_rows + dims[None, :].to(tl.int64) * S, mask)
            q = _chunk(total_ptr, total_rows + dims[None, :], mask)
            g = _chunk(grad_q_ptr, x_rows + dims[None, :].to(tl.int64) * S, mask)
            ee += tl.sum(e * e, axis=1)
            qq += tl.sum(q * q, axis=1)
            qg += tl.sum(q * g, axis=1)
        e_norm = tl.maximum(tl.sqrt(ee), 1e-12)
        q_norm = tl.sqrt(qq)
        inv_q = 1.0 / tl.maximum(q_norm, 1e-12)
        # (q.g stays in the first pass: moved into the second, which reloads g, the fp32
        # D32 variant spills 4 B on sm_80 with triton 3.6.)
        # w = (e^ + q^) / |e^ + q^|: its norm and w.g summed elementwise (from the row sums,
        # sqrt(2 + 2 cos) cancels catastrophically near e^ = -q^ and w is no unit vector).
        ww = tl.zeros([BLOCK_N], dtype=tl.float32)
        wg = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (dims < d)[None, :]
            w = (_chunk(x_ptr, x_rows + dims[None, :].to(tl.int64) * S, mask) / e_norm[:, None]
                 + _chunk(total_ptr, total_rows + dims[None, :], mask) * inv_q[:, None])
            ww += tl.sum(w * w, axis=1)
            wg += tl.sum(w * _chunk(grad_q_ptr, x_rows + dims[None, :].to(tl.int64) * S, mask), axis=1)
        # Within rounding of antiparallel, e^ + q^ is noise and w's direction arbitrary: w = 0
        # there (R = I - 2 e^ e^T, the exact formula's value at e^ = -q^), as the torch path.
        w_norm = tl.sqrt(ww)
        inv_w = tl.where(w_norm > 1e-6, 1.0 / tl.maximum(w_norm, 1e-6), 0.0)
        wg = wg * inv_w
        quantized = tl.load(idx_ptr + (group * num_levels).to(tl.int64) * N + rows,
                            mask=row_mask, other=-1) >= 0
        # straight through where |e| < MIN_NORM_RATIO * |q| (zero rows): lambda would blow up.
        # (A parameter: triton 3.8's interpreter cannot multiply a global constexpr by a tensor.)
        quantized = quantized & (tl.sqrt(ee) >= MIN_NORM_RATIO * q_norm)
        lam = tl.where(quantized, q_norm / e_norm, 1.0)
    for d0 in range(0, d, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (dims < d)[None, :]
        x_offsets = x_rows + dims[None, :].to(tl.int64) * S
        grad = _chunk(grad_q_ptr, x_offsets, mask)
        if ROTATION:
            e_hat = _chunk(x_ptr, x_offsets, mask) / e_norm[:, None]
            q_hat = _chunk(total_ptr, total_rows + dims[None, :], mask) * inv_q[:, None]
            w = (e_hat + q_hat) * inv_w[:, None]
            rotated = grad - 2.0 * w * wg[:, None] + 2.0 * e_hat * (qg * inv_q)[:, None]
            grad = tl.where(quantized[:, None], rotated, grad) * lam[:, None]
        grad_x = grad + (grad_scale * x_scale) * _chunk(commit_ptr, total_rows + dims[None, :], mask)
        tl.store(grad_x_ptr + x_offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _forward_config(dtype, precision, cosine):
    config = pick_config(dtype, precision, FORWARD_CONFIGS)
    if cosine and dtype == torch.float32 and precision == "ieee":
        config.update(COSINE_IEEE)
    return config


def _check(x, codebooks, num_levels, groups, mask=None, active=None):
    n, dim, s = vector_layout("x", x)
    if codebooks.dim() != 3 or not codebooks.is_contiguous() or not codebooks.is_floating_point():
        raise ValueError(f"codebooks must be a contiguous float [G*C, K, d] tensor, got "
                         f"{codebooks.dtype} {tuple(codebooks.shape)}")
    books, k, d = codebooks.shape
    if dim != groups * d or books not in (groups, groups * num_levels):
        raise ValueError(f"x has D={dim}, codebooks {tuple(codebooks.shape)}: expected D = "
                         f"groups * d = {groups} * {d} and G*C in ({groups}, {groups * num_levels})")
    if mask is not None and (mask.shape != (n,) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be bool [{n}], got {mask.dtype} {tuple(mask.shape)}")
    if active is not None and active.dim() != 0:
        raise ValueError(f"active must be a 0-d integer tensor, got shape {tuple(active.shape)}")
    check_same_device(x=x, codebooks=codebooks, **({"mask": mask} if mask is not None else {}))
    if max(n, k) * max(num_levels * groups, 1) >= 2**31:
        raise ValueError(f"too large for 32-bit indices: N={n}, K={k}, levels={num_levels}")
    return n, dim, s, books, k, d


def _books(groups, num_levels, books):
    """The codebook of every level slot ``g * Q + l``."""
    per_group = books // groups
    return [g * per_group + level % per_group for g in range(groups) for level in range(num_levels)]


def _sorted_sums(residuals, idx, slot_books, num_codes, codebooks=None, scale=None):
    """Per level, the deterministic per-code sums of its stored residuals (``[G*Q, N, d]``),
    or of ``codebooks[book] - residual`` times ``scale``: ``[G*Q, K, d]``."""
    return torch.stack([
        code_sums_sorted(residuals[slot], idx[slot], num_codes,
                         codebook=None if codebooks is None else codebooks[book], scale=scale)
        for slot, book in enumerate(slot_books)])


@launcher
def residual_quantize(x, codebooks, num_levels, groups, cosine, active, mask, with_code_sums,
                      precision="ieee", snapshot=None, raw_codes=False):
    """Same contract as ``vqfast._torch.residual_quantize``: ``x [N, D]`` or ``[B, D, S]``,
    ``codebooks [G*C, K, d]`` -> ``(q, idx [G*Q, N], sq_err [G*Q], counts [G*Q, K],
    code_sums [G*Q, K, d] or None)``. The dot runs in x's dtype with fp32 accumulation;
    ``precision`` applies to fp32 inputs. Deterministic mode sums the EMA statistics
    sorted by code (the kernel stores each level's residuals for it). ``raw_codes``: the
    search runs on the normalised codebooks (cosine), the rest on the raw ones."""
    n, dim, s, books, k, d = _check(x, codebooks, num_levels, groups, mask, active)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    codebooks32 = codebooks.float()
    searched = codebooks32
    if raw_codes:
        searched = codebooks32 / codebooks32.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        if snapshot is not None:
            snapshot.copy_(codebooks32)
    cast, sqnorm = codebook_prep(
        searched.view(books * k, d), x.dtype,
        snapshot.view(books * k, d) if snapshot is not None and not raw_codes else None)
    config = _forward_config(x.dtype, precision, cosine or raw_codes)
    tiles, slots = triton.cdiv(n, config["BLOCK_N"]), groups * num_levels
    sums = NO_SUMS
    if with_code_sums:
        sums = STORE_RESIDUALS if torch.are_deterministic_algorithms_enabled() else ATOMIC_SUMS
    q = torch.empty_like(x)
    total = torch.empty(n, dim, dtype=torch.float32, device=x.device)  # the running sums
    idx = torch.empty(slots, n, dtype=torch.int64, device=x.device)
    partial_err = torch.empty(tiles, slots, dtype=torch.float32, device=x.device)
    counts = torch.zeros(slots, k, dtype=torch.int32, device=x.device)
    code_sums = (torch.zeros(slots, k, d, dtype=torch.float32, device=x.device)
                 if sums == ATOMIC_SUMS else None)
    residuals = (torch.empty(slots, n, d, dtype=torch.float32, device=x.device)
                 if sums == STORE_RESIDUALS else None)
    launch(_residual_forward_kernel, (tiles, groups),
        x, codebooks32, cast.view(books, k, d), sqnorm,
        mask.view(torch.uint8) if mask is not None else counts,
        active if active is not None else counts, total, q, idx, partial_err, counts,
        code_sums if code_sums is not None else partial_err,
        residuals if residuals is not None else partial_err,
        n, dim, s, k, d, num_levels, books // groups,
        COSINE=2 if raw_codes else int(cosine), HAS_MASK=mask is not None,
        HAS_ACTIVE=active is not None, SUMS=sums, INPUT_PRECISION=precision if x.dtype == torch.float32 else "ieee",
        UPCAST_DOT=x.dtype == torch.bfloat16 and _launch.interpreted(x.device),
        STATS_SEM=_launch.STATS_SEM, **config)
    if sums == STORE_RESIDUALS:
        code_sums = _sorted_sums(residuals, idx, _books(groups, num_levels, books), k)
    return q, idx, partial_err.sum(0), counts, code_sums


@launcher
def residual_backward(grad_q, grad_scale, x, codebooks, idx, num_levels, groups, cosine,
                      rotation_trick, x_scale, codebook_scale, commit_levels=None):
    """Same contract as ``vqfast._torch.residual_backward``; one launch (plus the sorted
    sums of the codebook gradient in deterministic mode)."""
    n, dim, s, books, k, d = _check(x, codebooks, num_levels, groups)
    if grad_q.shape != x.shape or not grad_q.is_contiguous():
        raise ValueError(f"grad_q must be contiguous with shape {tuple(x.shape)}")
    codebooks = codebooks.float()
    grads = NO_SUMS
    if codebook_scale != 0:
        grads = STORE_RESIDUALS if torch.are_deterministic_algorithms_enabled() else ATOMIC_SUMS
    grad_scale = grad_scale.float().reshape(1)
    config = launch_config(BACKWARD_CONFIG, d)
    grad_x = torch.empty_like(x)
    scratch = torch.empty(2, n, dim, dtype=torch.float32, device=x.device)  # total, commit
    grad_codebooks = torch.zeros_like(codebooks) if grads == ATOMIC_SUMS else None
    residuals = (torch.empty(groups * num_levels, n, d, dtype=torch.float32, device=x.device)
                 if grads == STORE_RESIDUALS else None)
    launch(_residual_backward_kernel, (triton.cdiv(n, config["BLOCK_N"]), groups),
        grad_q, x, codebooks, idx, grad_scale, grad_x,
        grad_codebooks if grad_codebooks is not None else grad_scale,
        residuals if residuals is not None else grad_scale, scratch[0], scratch[1],
        n, dim, s, k, d, num_levels, books // groups,
        num_levels if commit_levels is None else commit_levels, float(x_scale),
        float(codebook_scale),
        COSINE=cosine, ROTATION=rotation_trick, GRADS=grads, STATS_SEM=_launch.STATS_SEM,
        MIN_NORM_RATIO=ROTATION_MIN_NORM_RATIO, **config)
    if grads == STORE_RESIDUALS:
        slot_books = _books(groups, num_levels, books)
        per_slot = _sorted_sums(residuals, idx, slot_books, k, codebooks,
                                grad_scale * codebook_scale)
        # Slot g * Q + l uses book g * Q + l (a codebook per level) or g (shared by the
        # levels): the per-book sum is a view, no index built from host data.
        grad_codebooks = (per_slot if books == groups * num_levels
                          else per_slot.view(groups, num_levels, k, d).sum(1))
    return grad_x, grad_codebooks


@launcher
def residual_codes(x, codebooks, num_levels, groups, cosine, mask, precision="ieee",
                   raw_codes=False):
    """The codes alone of ``residual_quantize`` (``idx`` int64 ``[G*Q, N]``): its fused
    launch, the other outputs left unread."""
    return residual_quantize(x, codebooks, num_levels, groups, cosine, None, mask, False,
                             precision, raw_codes=raw_codes)[1]


def aot_variants():
    """Every launchable configuration, for the ahead-of-time compile test: the forward in
    each dtype and precision, the backward per channel block, with their feature flags
    both ways (COSINE / SUMS / ROTATION / GRADS change the code the register allocator sees)."""
    forward_sig = {"x_ptr": None, "codebooks_ptr": "*fp32", "cast_ptr": None,
                   "sqnorm_ptr": "*fp32", "mask_ptr": "*u8", "active_ptr": "*i64",
                   "total_ptr": "*fp32", "q_ptr": None, "idx_ptr": "*i64",
                   "partial_err_ptr": "*fp32", "counts_ptr": "*i32", "code_sums_ptr": "*fp32",
                   "residuals_ptr": "*fp32", "N": "i32", "D": "i32", "S": "i32", "K": "i32",
                   "d": "i32", "num_levels": "i32", "books_per_group": "i32"}
    for dtype, torch_dtype in TORCH_DTYPES.items():
        for precision in (PRECISIONS if dtype == "fp32" else ("ieee",)):
            sig = dict(forward_sig, x_ptr=PTR[dtype], cast_ptr=PTR[dtype], q_ptr=PTR[dtype])
            for cosine, sums in ((0, ATOMIC_SUMS), (1, ATOMIC_SUMS), (1, STORE_RESIDUALS),
                                 (2, ATOMIC_SUMS)):
                config, options = split_options(_forward_config(torch_dtype, precision, cosine))
                consts = dict(config, COSINE=cosine, HAS_MASK=True, HAS_ACTIVE=True, SUMS=sums,
                              INPUT_PRECISION=precision, UPCAST_DOT=False,
                              STATS_SEM=_launch.STATS_SEM)
                yield (f"residual_forward[{dtype},{precision},cosine={cosine},sums={sums}]",
                       _residual_forward_kernel, sig, consts, options)
    for dtype, (cfg, options) in itertools.product(PTR, streaming_configs(BACKWARD_CONFIG)):
        for cosine, rotation, grads in ((False, False, ATOMIC_SUMS), (True, True, STORE_RESIDUALS)):
            sig = {"grad_q_ptr": PTR[dtype], "x_ptr": PTR[dtype], "codebooks_ptr": "*fp32",
                   "idx_ptr": "*i64", "grad_scale_ptr": "*fp32", "grad_x_ptr": PTR[dtype],
                   "grad_codebooks_ptr": "*fp32", "residuals_ptr": "*fp32", "total_ptr": "*fp32",
                   "commit_ptr": "*fp32", "N": "i32", "D": "i32", "S": "i32", "K": "i32",
                   "d": "i32", "num_levels": "i32", "books_per_group": "i32",
                   "commit_levels": "i32", "x_scale": "fp32", "codebook_scale": "fp32"}
            consts = dict(cfg, COSINE=cosine, ROTATION=rotation, GRADS=grads,
                          STATS_SEM=_launch.STATS_SEM, MIN_NORM_RATIO=ROTATION_MIN_NORM_RATIO)
            yield (f"residual_backward[{dtype},D{cfg['BLOCK_D']},cosine={cosine},"
                   f"rotation={rotation}]", _residual_backward_kernel, sig, consts, options)
