"""Fused residual / grouped VQ: every level of every group in one forward launch, one
backward launch.

One program per (tile of ``BLOCK_N`` rows, group). It loads the group's channels of its
rows once and keeps the residual in registers for all the levels: per level, a streamed
nearest-code search over that level's codebook (``tl.dot`` tiles, running argmin: never
``[N, K]``), the gather of the chosen codes in fp32, the exact squared error, the counts
and per-code sums of the EMA update (fp32 atomics), and ``r -= q``. The output, the sum
of the codes, is written once. The backward walks the levels again from the codes,
rebuilding each residual in registers: the commitment gradient of every level, the
codebook gradients, and (``ROTATION``) the rotation trick, all in the same pass.

A whole group row sits in registers, so a group is at most ``MAX_GROUP_DIM`` channels
(wider groups take the torch path: ``vqfast.ops.residual.residual_impl``).
"""

import itertools

import torch
import triton
import triton.language as tl

from ._checks import PTR, TORCH_DTYPES, check_same_device, next_power_of_2
from ._layout import row_offsets, vector_layout
from .code_sums import code_sums_sorted
from .nearest_code import PRECISIONS, codebook_prep

MAX_GROUP_DIM = 256
# Per padded group width (BLOCK_D): row tile, code tile, warps. The residual, the running
# sum of codes and the dot's accumulator live in registers; the code tile is staged in
# shared memory. Every entry is compiled for sm_80 / sm_90 by the AOT test, spill-free.
FORWARD_CONFIGS = {
    16: dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2),
    32: dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2),
    64: dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2),
    128: dict(BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=2),
    256: dict(BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=2),
}
BACKWARD_CONFIGS = {
    16: dict(BLOCK_N=64, num_warps=4),
    32: dict(BLOCK_N=64, num_warps=4),
    64: dict(BLOCK_N=32, num_warps=4),
    128: dict(BLOCK_N=32, num_warps=8),
    256: dict(BLOCK_N=16, num_warps=8),
}
# What happens to each level's (normalised) residuals for the EMA sums / codebook grads.
NO_SUMS, ATOMIC_SUMS, STORE_RESIDUALS = 0, 1, 2


@triton.jit
def _row_normalize(r):
    """Rows of ``r`` over ``max(|r|, 1e-12)`` (``F.normalize``) and that norm ``[BLOCK_N]``."""
    norm = tl.maximum(tl.sqrt(tl.sum(r * r, axis=1)), 1e-12)
    return r / norm[:, None], norm


@triton.jit
def _level_input(x_ptr, offsets, tile_mask, total, COSINE: tl.constexpr):
    """What a level quantizes: ``r = x - total`` (fp32), l2-normalised when ``COSINE``."""
    r = tl.load(x_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32) - total
    if COSINE:
        r, _ = _row_normalize(r)
    return r


@triton.jit
def _residual_forward_kernel(
    x_ptr, codebooks_ptr, cast_ptr, sqnorm_ptr, mask_ptr, active_ptr,
    q_ptr, idx_ptr, partial_err_ptr, counts_ptr, code_sums_ptr, residuals_ptr,
    N, D, S, K, d, num_levels, books_per_group,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    COSINE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ACTIVE: tl.constexpr,
    SUMS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    tile = tl.program_id(0)
    group = tl.program_id(1)
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < d
    tile_mask = row_mask[:, None] & dim_mask[None, :]
    offsets = row_offsets(rows, S, D)[:, None] + (group * d + dims)[None, :].to(tl.int64) * S
    valid = row_mask
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + rows, mask=row_mask, other=0) != 0)
    levels = num_levels
    if HAS_ACTIVE:  # quantize dropout: the first `active` levels run
        levels = tl.minimum(tl.load(active_ptr).to(tl.int32), num_levels)
    num_slots = tl.num_programs(1) * num_levels

    total = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    local_codes = tl.arange(0, BLOCK_K)
    for level in range(0, levels):
        slot = group * num_levels + level
        book = group * books_per_group + level % books_per_group
        book_base = book.to(tl.int64) * K * d
        # Only the running sum of codes is held across the search: the residual is x (read
        # again, an L1/L2 hit) minus it, so wide groups keep to the register budget.
        r_used = _level_input(x_ptr, offsets, tile_mask, total, COSINE)
        if UPCAST_DOT:
            r_dot = r_used
        else:
            r_dot = r_used.to(cast_ptr.dtype.element_ty)
        best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
        best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            code_mask = k0 + local_codes < K
            codes_t = tl.load(cast_ptr + book_base + (k0 + local_codes)[None, :] * d + dims[:, None],
                              mask=code_mask[None, :] & dim_mask[:, None], other=0.0)
            if UPCAST_DOT:
                codes_t = codes_t.to(tl.float32)
            dot = tl.dot(r_dot, codes_t, input_precision=INPUT_PRECISION)
            sqnorm = tl.load(sqnorm_ptr + book * K + k0 + local_codes, mask=code_mask,
                             other=float("inf"))
            dist = sqnorm[None, :] - 2.0 * dot
            dist = tl.where(dist == dist, dist, float("inf"))
            tile_best, tile_idx = tl.min(dist, axis=1, return_indices=True)
            better = tile_best < best  # ties: the lowest index, as torch.argmin
            best = tl.where(better, tile_best, best)
            best_idx = tl.where(better, tile_idx + k0, best_idx)
        code_offsets = book_base + best_idx.to(tl.int64)[:, None] * d + dims[None, :]
        level_mask = valid[:, None] & dim_mask[None, :]
        code = tl.load(codebooks_ptr + code_offsets, mask=level_mask, other=0.0)
        r_used = _level_input(x_ptr, offsets, tile_mask, total, COSINE)
        diff = tl.where(level_mask, code - r_used, 0.0)
        tl.store(partial_err_ptr + tile * num_slots + slot, tl.sum(tl.sum(diff * diff, axis=1), axis=0))
        tl.store(idx_ptr + slot.to(tl.int64) * N + rows, tl.where(valid, best_idx, -1).to(tl.int64),
                 mask=row_mask)
        tl.atomic_add(counts_ptr + slot * K + best_idx, tl.full([BLOCK_N], 1, dtype=tl.int32),
                      mask=valid)
        if SUMS == 1:
            tl.atomic_add(code_sums_ptr + slot.to(tl.int64) * K * d + best_idx[:, None] * d
                          + dims[None, :], r_used, mask=level_mask)
        if SUMS == 2:  # the deterministic path sums them sorted by code
            tl.store(residuals_ptr + (slot.to(tl.int64) * N + rows)[:, None] * d + dims[None, :],
                     r_used, mask=tile_mask)
        total = total + code
    for level in range(levels, num_levels):  # dropped levels: code -1, no error
        slot = group * num_levels + level
        tl.store(partial_err_ptr + tile * num_slots + slot, 0.0)
        tl.store(idx_ptr + slot.to(tl.int64) * N + rows, tl.full([BLOCK_N], -1, tl.int64),
                 mask=row_mask)
    if HAS_MASK:  # masked rows give back their input (read again: not held in registers)
        x = tl.load(x_ptr + offsets, mask=tile_mask & ~valid[:, None], other=0.0).to(tl.float32)
        total = tl.where(valid[:, None], total, x)
    tl.store(q_ptr + offsets, total.to(q_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _residual_backward_kernel(
    grad_q_ptr, x_ptr, codebooks_ptr, idx_ptr, grad_scale_ptr, grad_x_ptr, grad_codebooks_ptr,
    residuals_ptr, N, D, S, K, d, num_levels, books_per_group, x_scale, codebook_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, COSINE: tl.constexpr,
    ROTATION: tl.constexpr, GRADS: tl.constexpr,
):
    group = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < d
    tile_mask = row_mask[:, None] & dim_mask[None, :]
    offsets = row_offsets(rows, S, D)[:, None] + (group * d + dims)[None, :].to(tl.int64) * S
    grad_scale = tl.load(grad_scale_ptr)
    total = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    commit = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # sum_l d|r~_l - q_l|^2/2 / dr
    for level in range(0, num_levels):
        slot = group * num_levels + level
        book = group * books_per_group + level % books_per_group
        book_base = book.to(tl.int64) * K * d
        codes = tl.load(idx_ptr + slot.to(tl.int64) * N + rows, mask=row_mask, other=-1)
        level_mask = (codes >= 0)[:, None] & dim_mask[None, :]
        code_offsets = book_base + tl.maximum(codes, 0)[:, None] * d + dims[None, :]
        code = tl.load(codebooks_ptr + code_offsets, mask=level_mask, other=0.0)
        r = tl.load(x_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32) - total
        if COSINE:  # through the normalisation: (r^ (r^.q) - q) / |r|
            r_used, norm = _row_normalize(r)
            step = (r_used * tl.sum(r_used * code, axis=1)[:, None] - code) / norm[:, None]
        else:
            r_used = r
            step = r - code
        commit += tl.where(level_mask, step, 0.0)
        if GRADS == 1:
            tl.atomic_add(grad_codebooks_ptr + code_offsets,
                          (grad_scale * codebook_scale) * (code - r_used), mask=level_mask)
        if GRADS == 2:
            tl.store(residuals_ptr + (slot.to(tl.int64) * N + rows)[:, None] * d + dims[None, :],
                     r_used, mask=tile_mask)
        total = total + code
    grad = tl.load(grad_q_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
    if ROTATION:  # lambda R^T g, R the rotation of x^ onto q^, lambda = |q| / |x|
        quantized = tl.load(idx_ptr + (group * num_levels).to(tl.int64) * N + rows,
                            mask=row_mask, other=-1) >= 0
        e_hat, e_norm = _row_normalize(tl.load(x_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32))
        q_hat, _ = _row_normalize(total)
        q_norm = tl.sqrt(tl.sum(total * total, axis=1))
        w, _ = _row_normalize(e_hat + q_hat)
        rotated = (grad - 2.0 * w * tl.sum(w * grad, axis=1)[:, None]
                   + 2.0 * e_hat * tl.sum(q_hat * grad, axis=1)[:, None]) * (q_norm / e_norm)[:, None]
        grad = tl.where(quantized[:, None], rotated, grad)
    grad_x = grad + (grad_scale * x_scale) * commit
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=tile_mask)


def _check(x, codebooks, num_levels, groups, mask=None, active=None):
    n, dim, s = vector_layout("x", x)
    if codebooks.dim() != 3 or not codebooks.is_contiguous() or not codebooks.is_floating_point():
        raise ValueError(f"codebooks must be a contiguous float [G*C, K, d] tensor, got "
                         f"{codebooks.dtype} {tuple(codebooks.shape)}")
    books, k, d = codebooks.shape
    if dim != groups * d or books not in (groups, groups * num_levels):
        raise ValueError(f"x has D={dim}, codebooks {tuple(codebooks.shape)}: expected D = "
                         f"groups * d = {groups} * {d} and G*C in ({groups}, {groups * num_levels})")
    if d > MAX_GROUP_DIM:
        raise ValueError(f"group width {d} > {MAX_GROUP_DIM}: the fused kernels keep a group "
                         "row in registers (use more groups, codebook_dim, or the torch path)")
    if mask is not None and (mask.shape != (n,) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be bool [{n}], got {mask.dtype} {tuple(mask.shape)}")
    if active is not None and active.dim() != 0:
        raise ValueError(f"active must be a 0-d integer tensor, got shape {tuple(active.shape)}")
    check_same_device(x=x, codebooks=codebooks, **({"mask": mask} if mask is not None else {}))
    if max(n, k) * max(num_levels * groups, 1) >= 2**31:
        raise ValueError(f"too large for 32-bit indices: N={n}, K={k}, levels={num_levels}")
    return n, dim, s, books, k, d


def _block_d(d: int) -> int:
    return max(16, next_power_of_2(d))


def _sorted_sums(residuals, idx, books, num_codes, codebooks=None, scale=None):
    """Per level, the deterministic per-code sums of its stored residuals (``[G*Q, N, d]``),
    or of ``codebooks[book] - residual`` times ``scale``; levels sharing a book add up."""
    out = []
    for slot in range(residuals.shape[0]):
        book = books[slot]
        out.append(code_sums_sorted(residuals[slot], idx[slot], num_codes,
                                    codebook=None if codebooks is None else codebooks[book],
                                    scale=scale))
    return torch.stack(out)


def residual_quantize(x, codebooks, num_levels, groups, cosine, active, mask, with_code_sums,
                      precision="ieee", snapshot=None):
    """Same contract as ``vqfast._torch.residual_quantize``: ``x [N, D]`` or ``[B, D, S]``,
    ``codebooks [G*C, K, d]`` -> ``(q, idx [G*Q, N], sq_err [G*Q], counts [G*Q, K],
    code_sums [G*Q, K, d] or None)``. The dot runs in x's dtype with fp32 accumulation;
    ``precision`` applies to fp32 inputs. Deterministic mode sums the EMA statistics
    sorted by code (the kernel stores each level's residuals for it)."""
    n, _, s, books, k, d = _check(x, codebooks, num_levels, groups, mask, active)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    codebooks32 = codebooks.float()
    cast, sqnorm = codebook_prep(codebooks32.view(books * k, d), x.dtype,
                                 snapshot.view(books * k, d) if snapshot is not None else None)
    block_d = _block_d(d)
    config = dict(FORWARD_CONFIGS[block_d])
    tiles, slots = triton.cdiv(n, config["BLOCK_N"]), groups * num_levels
    sums = NO_SUMS
    if with_code_sums:
        sums = STORE_RESIDUALS if torch.are_deterministic_algorithms_enabled() else ATOMIC_SUMS
    q = torch.empty_like(x)
    idx = torch.empty(slots, n, dtype=torch.int64, device=x.device)
    partial_err = torch.empty(tiles, slots, dtype=torch.float32, device=x.device)
    counts = torch.zeros(slots, k, dtype=torch.int32, device=x.device)
    code_sums = (torch.zeros(slots, k, d, dtype=torch.float32, device=x.device)
                 if sums == ATOMIC_SUMS else None)
    residuals = (torch.empty(slots, n, d, dtype=torch.float32, device=x.device)
                 if sums == STORE_RESIDUALS else None)
    _residual_forward_kernel[(tiles, groups)](
        x, codebooks32, cast.view(books, k, d), sqnorm,
        mask.view(torch.uint8) if mask is not None else counts,
        active if active is not None else counts, q, idx, partial_err, counts,
        code_sums if code_sums is not None else partial_err,
        residuals if residuals is not None else partial_err,
        n, x.shape[1], s, k, d, num_levels, books // groups,
        BLOCK_D=block_d, COSINE=cosine, HAS_MASK=mask is not None, HAS_ACTIVE=active is not None,
        SUMS=sums, INPUT_PRECISION=precision if x.dtype == torch.float32 else "ieee",
        UPCAST_DOT=x.dtype == torch.bfloat16 and x.device.type != "cuda", **config)
    if sums == STORE_RESIDUALS:
        code_sums = _sorted_sums(residuals, idx, _books(groups, num_levels, books), k)
    return q, idx, partial_err.sum(0), counts, code_sums


def _books(groups, num_levels, books):
    """The codebook of every level slot ``g * Q + l``."""
    per_group = books // groups
    return [g * per_group + level % per_group for g in range(groups) for level in range(num_levels)]


def residual_backward(grad_q, grad_scale, x, codebooks, idx, num_levels, groups, cosine,
                      rotation_trick, x_scale, codebook_scale):
    """Same contract as ``vqfast._torch.residual_backward``; one launch (plus the sorted
    sums of the codebook gradient in deterministic mode)."""
    n, _, s, books, k, d = _check(x, codebooks, num_levels, groups)
    if grad_q.shape != x.shape or not grad_q.is_contiguous():
        raise ValueError(f"grad_q must be contiguous with shape {tuple(x.shape)}")
    codebooks = codebooks.float()
    grads = NO_SUMS
    if codebook_scale != 0:
        grads = STORE_RESIDUALS if torch.are_deterministic_algorithms_enabled() else ATOMIC_SUMS
    grad_scale = grad_scale.float().reshape(1)
    block_d = _block_d(d)
    config = BACKWARD_CONFIGS[block_d]
    grad_x = torch.empty_like(x)
    grad_codebooks = torch.zeros_like(codebooks) if grads == ATOMIC_SUMS else None
    residuals = (torch.empty(groups * num_levels, n, d, dtype=torch.float32, device=x.device)
                 if grads == STORE_RESIDUALS else None)
    _residual_backward_kernel[(triton.cdiv(n, config["BLOCK_N"]), groups)](
        grad_q, x, codebooks, idx, grad_scale, grad_x,
        grad_codebooks if grad_codebooks is not None else grad_scale,
        residuals if residuals is not None else grad_scale,
        n, x.shape[1], s, k, d, num_levels, books // groups, float(x_scale),
        float(codebook_scale), BLOCK_D=block_d, COSINE=cosine, ROTATION=rotation_trick,
        GRADS=grads, **config)
    if grads == STORE_RESIDUALS:
        slot_books = _books(groups, num_levels, books)
        per_slot = _sorted_sums(residuals, idx, slot_books, k, codebooks,
                                grad_scale * codebook_scale)
        grad_codebooks = torch.zeros_like(codebooks).index_add_(
            0, torch.tensor(slot_books, device=x.device), per_slot)
    return grad_x, grad_codebooks


def aot_variants():
    """Every launchable configuration, for the ahead-of-time compile test (the residual
    and dropout/mask paths share code with the variants listed; the full cross product of
    flags would multiply compile time without new code paths for the register allocator)."""
    for (block_d, config), dtype in itertools.product(FORWARD_CONFIGS.items(), PTR):
        config = dict(config)
        options = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
        for precision in (PRECISIONS if dtype == "fp32" else ("ieee",)):
            for cosine, sums in ((False, ATOMIC_SUMS), (True, STORE_RESIDUALS)):
                sig = {"x_ptr": PTR[dtype], "codebooks_ptr": "*fp32", "cast_ptr": PTR[dtype],
                       "sqnorm_ptr": "*fp32", "mask_ptr": "*u8", "active_ptr": "*i64",
                       "q_ptr": PTR[dtype], "idx_ptr": "*i64", "partial_err_ptr": "*fp32",
                       "counts_ptr": "*i32", "code_sums_ptr": "*fp32", "residuals_ptr": "*fp32",
                       "N": "i32", "D": "i32", "S": "i32", "K": "i32", "d": "i32",
                       "num_levels": "i32", "books_per_group": "i32"}
                consts = dict(config, BLOCK_D=block_d, COSINE=cosine, HAS_MASK=True,
                              HAS_ACTIVE=True, SUMS=sums, INPUT_PRECISION=precision,
                              UPCAST_DOT=False)
                yield (f"residual_forward[{dtype},{precision},D{block_d},cosine={cosine}]",
                       _residual_forward_kernel, sig, consts, options)
    for (block_d, config), dtype in itertools.product(BACKWARD_CONFIGS.items(), PTR):
        config = dict(config)
        options = {"num_warps": config.pop("num_warps")}
        for cosine, rotation, grads in ((False, False, ATOMIC_SUMS), (True, True, STORE_RESIDUALS),
                                        (False, True, NO_SUMS)):
            sig = {"grad_q_ptr": PTR[dtype], "x_ptr": PTR[dtype], "codebooks_ptr": "*fp32",
                   "idx_ptr": "*i64", "grad_scale_ptr": "*fp32", "grad_x_ptr": PTR[dtype],
                   "grad_codebooks_ptr": "*fp32", "residuals_ptr": "*fp32", "N": "i32",
                   "D": "i32", "S": "i32", "K": "i32", "d": "i32", "num_levels": "i32",
                   "books_per_group": "i32", "x_scale": "fp32", "codebook_scale": "fp32"}
            consts = dict(config, BLOCK_D=block_d, COSINE=cosine, ROTATION=rotation, GRADS=grads)
            yield (f"residual_backward[{dtype},D{block_d},cosine={cosine},rotation={rotation},"
                   f"grads={grads}]", _residual_backward_kernel, sig, consts, options)
