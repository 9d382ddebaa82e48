"""Fused nearest code: tiled ``x @ codebook^T`` with a running min / argmin over K.

Never materialises ``[N, K]``: each program owns ``BLOCK_N`` rows, walks the codebook in
``BLOCK_K`` tiles (``BLOCK_D`` channels at a time through ``tl.dot``, fp32 accumulation)
and keeps only the best distance and code per row in registers.

A prologue kernel reads the codebook once per call: its squared norms, its copy in x's
dtype for the 16-bit dot, and (for the EMA quantizer) an fp32 snapshot the backward
keeps, all in one launch.
"""

import itertools

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import (launch, cdiv, launcher, PTR, TORCH_DTYPES, check_codebook, check_same_device, launch_config,
                      split_options, streaming_configs)
from ._layout import row_offsets, vector_layout

PRECISIONS = ("ieee", "tf32", "tf32x3")
PREP_CONFIG = dict(BLOCK_K=32, MAX_BLOCK_D=64, num_warps=8)

# The configurations the launcher can pick (tests compile every one for sm_80 and sm_90
# with triton 3.6 and 3.9 and require zero register spills). 16-bit operands use tensor
# cores (mma / wgmma), fp32 "tf32"/"tf32x3" too; "ieee" runs on the FMA units. BLOCK_D=16
# matches the k-depth of one mma and keeps the operand tiles small: 32-wide channel chunks
# spill on sm_80 in every shape tried. Tile sizes from benchmarks/gpu/model.py (predicted,
# the large EMA step on an H100): tf32 at 128x128 ~3.2 ms (6.5 at 64x64); tf32x3 at 128x64
# ~4.4 ms with its three products in one accumulator (``dot_tf32x3``; triton's own split:
# 5.2 ms; 128x128: 188 registers, one program per SM, 5.9 ms); ieee at 2 stages spills on
# sm_80.
CONFIGS = {
    "16bit": dict(BLOCK_N=128, BLOCK_K=128, BLOCK_D=16, num_warps=8, num_stages=3),
    "tf32": dict(BLOCK_N=128, BLOCK_K=128, BLOCK_D=16, num_warps=8, num_stages=2),
    "tf32x3": dict(BLOCK_N=128, BLOCK_K=64, BLOCK_D=16, num_warps=8, num_stages=2),
    "ieee": dict(BLOCK_N=64, BLOCK_K=128, BLOCK_D=16, num_warps=8, num_stages=1),
}


@triton.jit
def running_argmin(dot, codebook_sqnorm, k0, best, best_idx):
    """Fold a tile of codes ``k0 ..`` into the running ``(best, best_idx)`` per row, from
    ``x.e`` (``dot [BLOCK_N, BLOCK_K]``) and ``|e|^2``: distance ``|e|^2 - 2 x.e``."""
    dist = codebook_sqnorm[None, :] - 2.0 * dot
    # A NaN row never wins a code: it keeps code 0 and reports a NaN distance.
    dist = tl.where(dist == dist, dist, float("inf"))
    tile_best, tile_idx = tl.min(dist, axis=1, return_indices=True)
    # Strictly better only: on ties the lowest code index wins, as with torch.argmin.
    better = tile_best < best
    return tl.where(better, tile_best, best), tl.where(better, tile_idx + k0, best_idx)


@triton.jit
def codes_transposed(tile_ptr, local_codes, dims, code_mask, D, UPCAST: tl.constexpr):
    """The codes ``tile_ptr + local_codes * D`` of a row-major ``[*, D]`` codebook, channels
    ``dims``, read transposed (``[BLOCK_D, BLOCK_K]``, the dot's right operand), zeros
    outside ``code_mask`` and ``D``; fp32 if ``UPCAST`` (see nearest_code's launcher)."""
    codes_t = tl.load(tile_ptr + local_codes[None, :] * D + dims[:, None],
                      mask=code_mask[None, :] & (dims < D)[:, None], other=0.0)
    if UPCAST:
        codes_t = codes_t.to(tl.float32)
    return codes_t


@triton.jit
def tf32_split(v):
    """``(hi, lo)``: fp32 ``v`` rounded to tf32 (to nearest, as triton's own tf32x3 split)
    and the rest, ``hi + lo == v``; where the rounding is not finite (``v`` an infinity or
    a NaN, or within half a tf32 step of fp32's largest), ``v`` itself and 0."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    finite = tl.abs(rounded) < float("inf")
    return tl.where(finite, rounded, v), tl.where(finite, v - rounded, 0.0)


@triton.jit
def dot_tf32x3(a, b, acc):
    """``acc + a @ b`` in three tf32 tensor-core products (hi.hi + hi.lo + lo.hi: about fp32's
    accuracy), into one accumulator: triton's own ``tf32x3`` sums the small products in a
    second one and scrubs its NaNs per dot, 32 registers and ~100 instructions more per
    chunk. Exact-input rows agree with it; a row with an infinite channel (whose distances
    are not finite either way) may pick another code: an infinite hi times a small lo of
    the other sign adds a NaN here, which triton's scrub drops."""
    a_hi, a_lo = tf32_split(a)
    b_hi, b_lo = tf32_split(b)
    acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
    acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
    return tl.dot(a_hi, b_hi, acc, input_precision="tf32")


@triton.jit
def _chunked_search(x_rows_ptr, row_mask, codebook_ptr, codebook_sqnorm_ptr, K, D, S,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``(best, best_idx, |x|^2)`` of the rows at ``x_rows_ptr``: code tiles of ``BLOCK_K``,
    each a dot accumulated over ``BLOCK_D``-channel chunks of x and the codes (any D)."""
    # |x|^2 per row, in fp32: added once at the end, it does not move the argmin.
    x_sqnorm = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_rows_ptr[:, None] + dims[None, :] * S,
                    mask=row_mask[:, None] & (dims[None, :] < D), other=0.0).to(tl.float32)
        x_sqnorm += tl.sum(x * x, axis=1)

    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    local_codes = tl.arange(0, BLOCK_K)
    codebook_tile_ptr = codebook_ptr  # advanced by whole tiles: 64-bit pointer arithmetic
    for k0 in range(0, K, BLOCK_K):
        code_mask = k0 + local_codes < K
        # x . e for this tile of codes, accumulated over channel chunks; the codebook is
        # read transposed ([BLOCK_D, BLOCK_K]) straight from its row-major [K, D] layout.
        dot = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_rows_ptr[:, None] + dims[None, :] * S,
                        mask=row_mask[:, None] & (dims < D)[None, :], other=0.0)
            if UPCAST_DOT:  # exact products either way; see the launcher
                x = x.to(tl.float32)
            codebook_t = codes_transposed(codebook_tile_ptr, local_codes, dims, code_mask, D,
                                          UPCAST_DOT)
            if INPUT_PRECISION == "tf32x3":
                dot = dot_tf32x3(x, codebook_t, dot)
            else:
                dot = tl.dot(x, codebook_t, dot, input_precision=INPUT_PRECISION)
        # Padding codes get |e|^2 = inf so they never win.
        codebook_sqnorm = tl.load(codebook_sqnorm_ptr + k0 + local_codes, mask=code_mask,
                                  other=float("inf"))
        best, best_idx = running_argmin(dot, codebook_sqnorm, k0, best, best_idx)
        codebook_tile_ptr += BLOCK_K * D
    return best, best_idx, x_sqnorm


@triton.jit
def _resident_search(x_rows_ptr, row_mask, codebook_ptr, codebook_sqnorm_ptr, K, D, S,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``_chunked_search`` for ``D <= BLOCK_D``, shaped for Hopper: the program's x tile is
    read once and stays on chip (only code tiles stream from L2), and the code tiles are
    software-pipelined by hand (the MMAs of tile j + 1 issued before the argmin of tile j)."""
    dims = tl.arange(0, BLOCK_D)
    x = tl.load(x_rows_ptr[:, None] + dims[None, :] * S,
                mask=row_mask[:, None] & (dims < D)[None, :], other=0.0)
    x_f32 = x.to(tl.float32)
    x_sqnorm = tl.sum(x_f32 * x_f32, axis=1)
    if UPCAST_DOT:
        x = x_f32

    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    local_codes = tl.arange(0, BLOCK_K)
    tile_ptr = codebook_ptr  # advanced by whole tiles: 64-bit pointer arithmetic
    dot = tl.dot(x, codes_transposed(tile_ptr, local_codes, dims, local_codes < K, D, UPCAST_DOT),
                 input_precision=INPUT_PRECISION)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        tile_ptr += BLOCK_K * D
        upcoming = tl.dot(x, codes_transposed(tile_ptr, local_codes, dims, k0 + local_codes < K,
                                              D, UPCAST_DOT), input_precision=INPUT_PRECISION)
        codebook_sqnorm = tl.load(codebook_sqnorm_ptr + (k0 - BLOCK_K) + local_codes)
        best, best_idx = running_argmin(dot, codebook_sqnorm, k0 - BLOCK_K, best, best_idx)
        dot = upcoming
    last = (K - 1) // BLOCK_K * BLOCK_K
    codebook_sqnorm = tl.load(codebook_sqnorm_ptr + last + local_codes, mask=last + local_codes < K,
                              other=float("inf"))
    best, best_idx = running_argmin(dot, codebook_sqnorm, last, best, best_idx)
    return best, best_idx, x_sqnorm


@triton.jit
def _nearest_code_kernel(
    x_ptr, codebook_ptr, codebook_sqnorm_ptr, idx_ptr, sqdist_ptr,
    N, K, D, S,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, RESIDENT: tl.constexpr,
):
    # x is addressed by 64-bit row offsets (no overflow for N * D >= 2**31). Vectors are
    # [N, D] rows or the columns of a channels-first [B, D, S] (see _layout). (A 64-bit tile
    # base plus 32-bit offsets inside it made triton 3.6 load channels-first x with scalar
    # 16-bit loads and a full wait every 16 channels on sm_90; these pipeline through
    # cp.async: tests/test_aot.py reads it from the JIT's own specialisation.)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    x_rows_ptr = x_ptr + row_offsets(rows, S, D)  # int64 offsets: see the note above
    if RESIDENT:  # D <= BLOCK_D: see resident_config
        best, best_idx, x_sqnorm = _resident_search(
            x_rows_ptr, row_mask, codebook_ptr, codebook_sqnorm_ptr, K, D, S,
            BLOCK_N, BLOCK_K, BLOCK_D, INPUT_PRECISION, UPCAST_DOT)
    else:
        best, best_idx, x_sqnorm = _chunked_search(
            x_rows_ptr, row_mask, codebook_ptr, codebook_sqnorm_ptr, K, D, S,
            BLOCK_N, BLOCK_K, BLOCK_D, INPUT_PRECISION, UPCAST_DOT)
    tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_mask)
    tl.store(sqdist_ptr + rows, tl.maximum(best + x_sqnorm, 0.0, propagate_nan=tl.PropagateNan.ALL),
             mask=row_mask)


@triton.jit
def _codebook_prep_kernel(
    codebook_ptr, cast_ptr, sqnorm_ptr, snapshot_ptr, zero_ptr, zero_counts_ptr, K, D,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_CAST: tl.constexpr,
    WRITE_SNAPSHOT: tl.constexpr, WRITE_ZERO: tl.constexpr, ZERO_ROWS: tl.constexpr,
):
    codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    code_mask = codes < K
    if WRITE_ZERO:  # the next launches' accumulators (counts + a ticket, and zero_ptr's [K, D])
        tl.store(zero_counts_ptr + codes, tl.zeros_like(codes), mask=codes < K + 1)
        if tl.program_id(0) == 0:
            tl.store(zero_counts_ptr + K, 0)
    code_offsets = codes.to(tl.int64)[:, None] * D
    sqnorm = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = code_mask[:, None] & (dims < D)[None, :]
        code = tl.load(codebook_ptr + code_offsets + dims[None, :], mask=mask, other=0.0)
        if WRITE_SNAPSHOT:
            tl.store(snapshot_ptr + code_offsets + dims[None, :], code.to(tl.float32), mask=mask)
        if ZERO_ROWS:  # no fill launches of their own
            tl.store(zero_ptr + code_offsets + dims[None, :], tl.zeros_like(code).to(tl.float32),
                     mask=mask)
        if WRITE_CAST:  # the norms are taken of the rounded codes the dot sees
            code = code.to(cast_ptr.dtype.element_ty)
            tl.store(cast_ptr + code_offsets + dims[None, :], code, mask=mask)
        code = code.to(tl.float32)
        sqnorm += tl.sum(code * code, axis=1)
    tl.store(sqnorm_ptr + codes, sqnorm, mask=code_mask)


@launcher
def codebook_prep(codebook: torch.Tensor, dtype: torch.dtype, snapshot: torch.Tensor | None = None,
                  zero: tuple | None = None):
    """One pass over ``codebook [K, D]``: ``(codebook in dtype, fp32 squared norms [K])``,
    the norms of the rounded codes; writes an fp32 copy into ``snapshot`` and zeros into
    ``zero = (fp32 [K, D] or None, int32 [K + 1])`` if given."""
    k, d = codebook.shape
    cast = codebook if codebook.dtype == dtype else torch.empty(k, d, dtype=dtype,
                                                                device=codebook.device)
    sqnorm = torch.empty(k, dtype=torch.float32, device=codebook.device)
    config = launch_config(PREP_CONFIG, d)
    launch(_codebook_prep_kernel, (cdiv(k, config["BLOCK_K"]),),
        codebook, cast, sqnorm, snapshot if snapshot is not None else sqnorm,
        *((zero[0] if zero[0] is not None else sqnorm, zero[1]) if zero is not None
          else (sqnorm, sqnorm)), k, d, WRITE_CAST=cast is not codebook,
        WRITE_SNAPSHOT=snapshot is not None, WRITE_ZERO=zero is not None,
        ZERO_ROWS=zero is not None and zero[0] is not None, **config)
    return cast, sqnorm


# The x-resident search (_resident_search) for 16-bit x with D <= 256: the x
# tile [BLOCK_N, D] in shared memory, code tiles [D, BLOCK_K] streamed through it. 32-code
# tiles keep it at ~100 registers and 96 KiB of shared memory at D = 256, so two programs
# share an SM and one's argmin runs while the other's MMAs do (benchmarks/gpu/model.py:
# the large bf16 search ~0.7 ms on an H100, predicted, from ~1.6 ms with 16-channel chunks).
# Above 128 channels only where x's tile loads vectorise ([N, D] rows, or a channels-first
# spatial size divisible by 16 on an aligned tensor): other layouts spill at 256 channels.
RESIDENT_MAX_D, RESIDENT_ANY_LAYOUT_D = 256, 128
RESIDENT_CONFIG = dict(BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=2)


def resident_config(dtype: torch.dtype, d: int, s: int = 1, aligned: bool = True) -> dict | None:
    """The x-resident search's block sizes and launch options for ``x`` of ``dtype`` with
    ``d`` channels and spatial size ``s``, or None where it does not apply."""
    if dtype == torch.float32 or d > RESIDENT_MAX_D:
        return None
    if d > RESIDENT_ANY_LAYOUT_D and s != 1 and (s % 16 or not aligned):
        return None
    return dict(RESIDENT_CONFIG, BLOCK_D=max(16, triton.next_power_of_2(d)))


def pick_config(dtype: torch.dtype, precision: str = "ieee", configs=None) -> dict:
    """Block sizes and launch options for an input dtype and fp32 dot precision, from
    ``configs`` (keys ``16bit``, ``tf32``, ``ieee`` and optionally ``tf32x3``, else
    ``tf32`` serves it; default: this kernel's)."""
    configs = configs or CONFIGS
    key = "16bit" if dtype != torch.float32 else precision if precision in configs else "tf32"
    return dict(configs[key])


@launcher
def nearest_code(x: torch.Tensor, codebook: torch.Tensor, precision: str = "ieee",
                 snapshot: torch.Tensor | None = None, zero: tuple | None = None):
    """``x: [N, D]`` or ``[B, D, S]``, ``codebook: [K, D]`` -> ``idx: int64 [N]``, ``sqdist: fp32 [N]``.

    ``snapshot`` (fp32 ``[K, D]``), if given, receives a copy of the codebook (same launch);
    ``zero = (fp32 [K, D] or None, int32 [K + 1])``, if given, is zeroed there too (``gather_loss``'s
    accumulators, or the codebook gradient's: no fill launches of their own).

    The dot runs in x's dtype (the codebook is rounded to it for fp16/bf16 inputs) with
    fp32 accumulation; ``precision`` applies to fp32 inputs (see ``vqfast.nearest_code``).
    With fp16 inputs a code whose entries overflow fp16 (|e| > 65504, e.g. a long-dead EMA
    code divided by a tiny cluster size) counts as infinitely far and is never chosen.
    """
    n, d, s = vector_layout("x", x)
    check_codebook(codebook, d)
    check_same_device(x=x, codebook=codebook)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    k = codebook.shape[0]
    resident = resident_config(x.dtype, d, s, x.data_ptr() % 16 == 0)
    config = resident or pick_config(x.dtype, precision)
    if max(n, k) >= 2**31 or (config["BLOCK_N"] + s) * d + s >= 2**31:
        raise ValueError(f"too large for 32-bit indices / tile offsets: N={n}, K={k}, D={d}, S={s}")
    # The dot's operands share x's dtype: the codebook is rounded once per call (not per
    # tile), and its norms are taken of the rounded codes the dot sees.
    for name, t, shape, dtype in (("snapshot", snapshot, codebook.shape, torch.float32),
                                  *((("zero", zero[0], codebook.shape, torch.float32),
                                     ("zero counts", zero[1], (k + 1,), torch.int32))
                                    if zero is not None else ())):
        if t is not None and (t.shape != shape or t.dtype != dtype or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous {dtype} {list(shape)}, got "
                             f"{t.dtype} {tuple(t.shape)}")
    codebook, codebook_sqnorm = codebook_prep(codebook, x.dtype, snapshot, zero)
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    sqdist = torch.empty(n, dtype=torch.float32, device=x.device)
    grid = (cdiv(n, config["BLOCK_N"]),)
    launch(_nearest_code_kernel, grid,
        x, codebook, codebook_sqnorm, idx, sqdist, n, k, d, s,
        INPUT_PRECISION=precision if x.dtype == torch.float32 else "ieee",
        # The Triton interpreter (3.8) multiplies bf16 dot operands as raw bits; upcasting
        # them is exact (bf16 x bf16 fits fp32), so results are what the GPU computes.
        UPCAST_DOT=x.dtype == torch.bfloat16 and _launch.interpreted(x.device),
        RESIDENT=resident is not None, **config)
    return idx, sqdist


def aot_variants():
    """(name, kernel, signature, constexprs, options) of every configuration the launcher
    can pick, for the ahead-of-time compile test (``tests/aot_compile.py``)."""
    for dtype, torch_dtype in TORCH_DTYPES.items():
        sig = {"x_ptr": PTR[dtype], "codebook_ptr": PTR[dtype], "codebook_sqnorm_ptr": "*fp32",
               "idx_ptr": "*i64", "sqdist_ptr": "*fp32", "N": "i32", "K": "i32", "D": "i32",
               "S": "i32"}
        for precision in (PRECISIONS if dtype == "fp32" else ("ieee",)):
            config, options = split_options(pick_config(torch_dtype, precision))
            consts = dict(config, INPUT_PRECISION=precision, UPCAST_DOT=False, RESIDENT=False)
            yield f"nearest_code[{dtype},{precision}]", _nearest_code_kernel, sig, consts, options
        for d in ((RESIDENT_ANY_LAYOUT_D, RESIDENT_MAX_D) if dtype != "fp32" else ()):
            config, options = split_options(resident_config(torch_dtype, d))
            consts = dict(config, INPUT_PRECISION="ieee", UPCAST_DOT=False, RESIDENT=True)
            if d > RESIDENT_ANY_LAYOUT_D:  # [N, D] rows only (S = 1) without alignment
                yield (f"nearest_code_resident[{dtype},D{d},S=1]", _nearest_code_kernel,
                       {k: v for k, v in sig.items() if k != "S"}, dict(consts, S=1), options)
            else:
                yield (f"nearest_code_resident[{dtype},D{d}]", _nearest_code_kernel,
                       sig, consts, options)
    # (snapshot, zero, rows): the search alone; quantize's eval pass, its learned-codebook
    # pass with a gradient, its EMA pass
    passes = ((False, False, False), (False, True, False), (False, True, True), (True, True, True))
    for dtype, (cfg, options), cast, (snapshot, zero, rows) in itertools.product(
            PTR, streaming_configs(PREP_CONFIG), (True, False), passes):
        if cast and dtype == "fp32":
            continue
        sig = {"codebook_ptr": "*fp32", "cast_ptr": PTR[dtype], "sqnorm_ptr": "*fp32",
               "snapshot_ptr": "*fp32", "zero_ptr": "*fp32",
               "zero_counts_ptr": "*i32" if zero else "*fp32", "K": "i32", "D": "i32"}
        yield (f"codebook_prep[{dtype},D{cfg['BLOCK_D']},cast={cast},snapshot={snapshot},"
               f"zero={zero},rows={rows}]", _codebook_prep_kernel, sig,
               dict(cfg, WRITE_CAST=cast, WRITE_SNAPSHOT=snapshot, WRITE_ZERO=zero,
                    ZERO_ROWS=rows), options)
