"""EMA codebook update, given this batch's counts and sums: two launches over K, for one
codebook or C of them (residual levels, groups) at once: program axis 1 picks the codebook.

1. ``_ema_scalars_kernel`` (one program): whether to apply the update at all (the
   batch's loss is finite and no rank flagged a non-finite batch), ``n`` of the Laplace
   smoothing (the sum of the decayed cluster sizes), and the bookkeeping buffers
   (``decay_weight = 1 - decay**t`` for the bias-corrected sizes, the skipped-batch count).
2. ``_ema_finalize_kernel`` (one program per block of codes):
   ``size = decay * size + (1 - decay) * count``; Laplace smoothing with the total ``n``:
   ``size = (size + eps) / (n + K * eps) * n`` (K: the codebook's own size when codebooks
   of several sizes are padded to one, the padding left untouched); ``ema_weight = decay * ema_weight +
   (1 - decay) * code_sums``; ``codebook = ema_weight / size``. All in place, fp32 math,
   and only where ``apply`` is set: decided on the device, never read by the host.
   With ``RESEED`` it also re-seeds the dead codes in the same pass (the dead-code rule of
   ``VectorQuantizerEMA``): a code whose bias-corrected size ``size / decay_weight`` fell
   below ``threshold`` takes a random row of this batch's ``x`` (Philox, keyed by a seed
   on the device that the scalars kernel advances once per update), starting at a size
   of ``start * decay_weight``; ``reseeded`` counts them.
"""

import itertools

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import launch, cdiv, PTR, launcher, launch_config, split_options, streaming_configs
from ._layout import row_offsets, vector_layout

CONFIG = dict(BLOCK_K=32, MAX_BLOCK_D=64, num_warps=4)
SCALARS_CONFIG = dict(BLOCK_REDUCE=1024, num_warps=4)


@triton.jit
def _dead_codes(size, weight, candidates, codes, seed, N, S, D, threshold, reseeded_ptr,
                STATS_SEM: tl.constexpr):
    """The dead-code rule on a block of codes: ``dead``, the ``candidates`` whose
    bias-corrected size ``size / weight`` is below ``threshold`` (counted into
    ``reseeded``), and the element offset of each code's random row of x (Philox keyed by
    ``seed``)."""
    dead = candidates & (size / tl.maximum(weight, 1e-30) < threshold)
    tl.atomic_add(reseeded_ptr, tl.sum(dead.to(tl.int64), axis=0), sem=STATS_SEM)
    rows = tl.randint(seed, codes).to(tl.int64) % N
    return dead, row_offsets(rows, S, D)


@triton.jit
def _row_samples(x_ptr, sample_offsets, dims, S, mask):
    """Channels ``dims`` of the sampled rows (fp32 ``[BLOCK_K, BLOCK_D]``, 0 off ``mask``)."""
    return tl.load(x_ptr + sample_offsets[:, None] + dims[None, :].to(tl.int64) * S,
                   mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _ema_scalars_kernel(
    counts_ptr, size_ptr, loss_ptr, flag_ptr, active_ptr, num_codes_ptr, scalars_ptr,
    decay_weight_ptr, skipped_ptr, seed_ptr, K, decay,
    BLOCK_REDUCE: tl.constexpr, HAS_FLAG: tl.constexpr, HAS_ACTIVE: tl.constexpr,
    HAS_NUM_CODES: tl.constexpr, RESEED: tl.constexpr,
):
    book = tl.program_id(0)
    counts_ptr += book.to(tl.int64) * K
    size_ptr += book.to(tl.int64) * K
    num_codes = K
    if HAS_NUM_CODES:  # this codebook's own size (the rest is padding)
        num_codes = tl.load(num_codes_ptr + book)
    lanes = tl.arange(0, BLOCK_REDUCE)
    total = tl.zeros([BLOCK_REDUCE], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_REDUCE):
        mask = k0 + lanes < num_codes
        size = tl.load(size_ptr + k0 + lanes, mask=mask, other=0.0)
        count = tl.load(counts_ptr + k0 + lanes, mask=mask, other=0).to(tl.float32)
        total += size * decay + (1.0 - decay) * count
    loss = tl.load(loss_ptr)
    finite = (loss == loss) & (tl.abs(loss) < float("inf"))
    if HAS_FLAG:  # a rank saw a non-finite batch (all-reduced)
        finite = finite & (tl.load(flag_ptr) == 0)
    apply = finite
    if HAS_ACTIVE:  # a level dropped this batch keeps its state
        apply = apply & (tl.load(active_ptr + book) != 0)
    tl.store(scalars_ptr + 3 * book, apply.to(tl.float32))
    tl.store(scalars_ptr + 3 * book + 1, tl.sum(total, axis=0))
    tl.store(scalars_ptr + 3 * book + 2, num_codes.to(tl.float32))
    weight = tl.load(decay_weight_ptr + book)
    tl.store(decay_weight_ptr + book, tl.where(apply, weight * decay + (1.0 - decay), weight))
    tl.store(skipped_ptr + book, tl.load(skipped_ptr + book) + tl.where(finite, 0, 1).to(tl.int64))
    if RESEED:  # this update's random rows: a new Philox key (read by the finalize launch)
        tl.store(seed_ptr, tl.load(seed_ptr) + 1)


@triton.jit
def _ema_finalize_kernel(
    counts_ptr, code_sums_ptr, scalars_ptr, size_ptr, weight_ptr, codebook_ptr,
    x_ptr, seed_ptr, decay_weight_ptr, reseeded_ptr,
    K, D, N, S, decay, epsilon, threshold, start,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, RESEED: tl.constexpr,
    STATS_SEM: tl.constexpr, SIZE_RULE: tl.constexpr = 0,
):
    book = tl.program_id(1)
    counts_ptr += book.to(tl.int64) * K
    size_ptr += book.to(tl.int64) * K
    book_offset = book.to(tl.int64) * K * D
    code_sums_ptr += book_offset
    weight_ptr += book_offset
    codebook_ptr += book_offset
    codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    # Not applied: an empty code range, so nothing below stores; padding codes never store.
    num_codes = tl.load(scalars_ptr + 3 * book + 2)
    code_mask = codes < tl.where(tl.load(scalars_ptr + 3 * book) != 0, num_codes.to(tl.int32), 0)
    total = tl.load(scalars_ptr + 3 * book + 1)
    count = tl.load(counts_ptr + codes, mask=code_mask, other=0).to(tl.float32)
    size = tl.load(size_ptr + codes, mask=code_mask, other=0.0).to(tl.float32)
    size = size * decay + (1.0 - decay) * count
    if SIZE_RULE == 2:  # moshi's: no smoothing, a floor
        divisor = tl.maximum(size, epsilon)
    else:  # Laplace smoothing over the codebook's total
        divisor = (size + epsilon) / (total + num_codes * epsilon) * total
    if SIZE_RULE == 0:  # stored: smoothed (the original's), else as decayed (encodec's, moshi's)
        size = divisor
    if RESEED:  # (one codebook)
        decay_weight = tl.load(decay_weight_ptr)
        dead, sample_offsets = _dead_codes(size, decay_weight, code_mask, codes,
                                           tl.load(seed_ptr), N, S, D, threshold,
                                           reseeded_ptr, STATS_SEM)
        size = tl.where(dead, start * decay_weight, size)
    tl.store(size_ptr + codes, size.to(size_ptr.dtype.element_ty), mask=code_mask)

    code_offsets = codes.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = code_mask[:, None] & (dims[None, :] < D)
        offsets = code_offsets + dims[None, :]
        weight = tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        sums = tl.load(code_sums_ptr + offsets, mask=mask, other=0.0)
        weight = weight * decay + (1.0 - decay) * sums
        code = weight / divisor[:, None]
        if RESEED:  # a dead code becomes the sampled row, weighted by its new size
            reseed = dead[:, None] & mask
            sample = _row_samples(x_ptr, sample_offsets, dims, S, reseed)
            code = tl.where(reseed, sample, code)
            weight = tl.where(reseed, sample * size[:, None], weight)
        tl.store(weight_ptr + offsets, weight.to(weight_ptr.dtype.element_ty), mask=mask)
        tl.store(codebook_ptr + offsets, code.to(codebook_ptr.dtype.element_ty), mask=mask)


@launcher
def ema_update(counts, code_sums, loss, not_finite, ema_cluster_size, ema_weight, codebook,
               ema_decay_weight, skipped_batches, decay, epsilon, active=None, num_codes=None,
               x=None, seed=None, reseeded=None, threshold=0.0, size_rule=0):
    """In place on ``ema_cluster_size [K]``, ``ema_weight [K, D]``, ``codebook [K, D]``,
    ``ema_decay_weight`` (fp32 0-d) and ``skipped_batches`` (int64 0-d); returns ``applied``
    (fp32 0-d: 1 if the update was made, else 0). C codebooks: a leading ``[C]`` on all of
    them (and on ``applied``); ``active`` (bool ``[C]`` or ``None``) skips the inactive.

    ``counts``: int32 ``[K]``; ``code_sums``: fp32 ``[K, D]``; ``loss``: fp32 0-d, the
    batch's (a non-finite loss skips the update); ``not_finite``: 0-d bool or ``None``, a
    flag from the other ranks. ``num_codes`` (int32 ``[C]`` or ``None``): each codebook's
    own size, the codes past it padding. Everything is read on the device: no host sync.

    Dead-code re-seeding in the same launch (one codebook; ``threshold > 0``): ``x`` (this
    batch's ``[N, D]`` or ``[B, D, S]``), ``seed`` (int64 ``[1]``, advanced once per
    update) and ``reseeded`` (int64 0-d, the count) as ``VectorQuantizerEMA`` keeps them.
    ``size_rule``: 0 stores the smoothed sizes; 1 the decayed ones, smoothed only to divide
    (encodec's); 2 the decayed ones, divided by ``max(size, epsilon)`` (moshi's). A
    re-seeding codebook keeps rule 0.
    """
    if size_rule not in (0, 1, 2) or (size_rule and threshold > 0):
        raise ValueError(f"size_rule must be 0, 1 or 2, and 0 with re-seeding in the same "
                         f"launch; got {size_rule!r}")
    *lead, k, d = codebook.shape
    books = lead[0] if lead else 1
    for name, t in (("ema_cluster_size", ema_cluster_size), ("ema_weight", ema_weight),
                    ("codebook", codebook), ("code_sums", code_sums)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if (ema_weight.shape != codebook.shape or code_sums.shape != codebook.shape
            or ema_cluster_size.shape != codebook.shape[:-1] or counts.shape != codebook.shape[:-1]
            or ema_decay_weight.shape != tuple(lead) or skipped_batches.shape != tuple(lead)):
        raise ValueError(f"EMA state shapes disagree with codebook {list(codebook.shape)}: "
                         f"ema_weight {tuple(ema_weight.shape)}, code_sums "
                         f"{tuple(code_sums.shape)}, ema_cluster_size "
                         f"{tuple(ema_cluster_size.shape)}, counts {tuple(counts.shape)}, "
                         f"ema_decay_weight {tuple(ema_decay_weight.shape)}")
    reseed = threshold > 0
    n, s = 1, 1
    if reseed:
        if lead or x is None or seed is None or reseeded is None:
            raise ValueError("re-seeding takes one codebook, x, seed and reseeded")
        n, dx, s = vector_layout("x", x)
        if dx != d or seed.shape != (1,) or seed.dtype != torch.int64:
            raise ValueError(f"x must have D={d} channels and seed be int64 [1], got x "
                             f"{tuple(x.shape)}, seed {seed.dtype} {tuple(seed.shape)}")
    scalars = torch.empty(books, 3, dtype=torch.float32, device=codebook.device)  # apply, n, K
    launch(_ema_scalars_kernel, (books,),
        counts, ema_cluster_size, loss.reshape(1),
        not_finite.to(torch.int32).reshape(1) if not_finite is not None else counts,
        active.to(torch.int32) if active is not None else counts,
        num_codes.to(torch.int32) if num_codes is not None else counts,
        scalars, ema_decay_weight, skipped_batches, seed if reseed else counts, k, float(decay),
        HAS_FLAG=not_finite is not None, HAS_ACTIVE=active is not None,
        HAS_NUM_CODES=num_codes is not None, RESEED=reseed, **SCALARS_CONFIG)
    config = launch_config(CONFIG, d)
    launch(_ema_finalize_kernel, (cdiv(k, config["BLOCK_K"]), books),
        counts, code_sums, scalars, ema_cluster_size, ema_weight, codebook,
        *((x, seed, ema_decay_weight, reseeded) if reseed else (codebook,) * 4),
        k, d, n, s, float(decay), float(epsilon), float(threshold), max(float(threshold), 1.0),
        RESEED=reseed, STATS_SEM=_launch.STATS_SEM, SIZE_RULE=int(size_rule), **config)
    return scalars[:, 0].view(ema_decay_weight.shape)


@triton.jit
def _reseed_codes_kernel(
    size_ptr, decay_weight_ptr, codebook_ptr, x_ptr, seed_ptr, reseeded_ptr,
    K, D, N, S, threshold, start,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, STATS_SEM: tl.constexpr,
):
    codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    code_mask = codes < K
    weight = tl.load(decay_weight_ptr)
    size = tl.load(size_ptr + codes, mask=code_mask, other=0.0)
    tracked = size * 0.0 + weight > 0  # (as a block: any usage seen yet)
    dead, sample_offsets = _dead_codes(size, weight, code_mask & tracked, codes,
                                       tl.load(seed_ptr), N, S, D, threshold, reseeded_ptr,
                                       STATS_SEM)
    tl.store(size_ptr + codes, start * weight + size * 0.0, mask=dead)
    code_offsets = codes.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = dead[:, None] & (dims[None, :] < D)
        sample = _row_samples(x_ptr, sample_offsets, dims, S, mask)
        tl.store(codebook_ptr + code_offsets + dims[None, :],
                 sample.to(codebook_ptr.dtype.element_ty), mask=mask)


@launcher
def reseed_codes(size, decay_weight, codebook, x, seed, reseeded, threshold):
    """Dead-code re-seeding of a learned codebook, one launch, in place: the codes whose
    bias-corrected usage ``size / decay_weight`` (fp32 ``[K]`` and 0-d; none before any
    usage was seen) is below ``threshold`` take a random row of ``x`` (``[N, D]`` or
    ``[B, D, S]``; Philox keyed by ``seed``, int64 ``[1]``, which ``gather_loss(...,
    usage=)`` advances) into ``codebook [K, D]``, with a usage of ``max(threshold, 1) *
    decay_weight``; ``reseeded`` (int64 0-d) counts them. No host sync.
    """
    n, d, s = vector_layout("x", x)
    k = codebook.shape[0]
    if codebook.shape != (k, d) or not codebook.is_contiguous() or size.shape != (k,):
        raise ValueError(f"codebook must be a contiguous [K, {d}] and size [K], got codebook "
                         f"{tuple(codebook.shape)}, size {tuple(size.shape)}")
    config = launch_config(CONFIG, d)
    launch(_reseed_codes_kernel, (cdiv(k, config["BLOCK_K"]),),
        size, decay_weight, codebook, x, seed, reseeded, k, d, n, s, float(threshold),
        max(float(threshold), 1.0), STATS_SEM=_launch.STATS_SEM, **config)


def aot_variants():
    """Every launchable configuration, for the ahead-of-time compile test."""
    for has_flag, has_active, has_num, reseed in itertools.product(*[(True, False)] * 4):
        sig = {"counts_ptr": "*i32", "size_ptr": "*fp32", "loss_ptr": "*fp32",
               "flag_ptr": "*i32", "active_ptr": "*i32", "num_codes_ptr": "*i32",
               "scalars_ptr": "*fp32", "decay_weight_ptr": "*fp32", "skipped_ptr": "*i64",
               "seed_ptr": "*i64" if reseed else "*i32", "K": "i32", "decay": "fp32"}
        consts, options = split_options(SCALARS_CONFIG)
        consts.update(HAS_FLAG=has_flag, HAS_ACTIVE=has_active, HAS_NUM_CODES=has_num,
                      RESEED=reseed)
        yield (f"ema_scalars[flag={has_flag},active={has_active},num_codes={has_num},"
               f"reseed={reseed}]", _ema_scalars_kernel, sig, consts, options)
    for (cfg, options), x_dtype in itertools.product(streaming_configs(CONFIG), (None, *PTR)):
        reseed = x_dtype is not None
        sig = {"counts_ptr": "*i32", "code_sums_ptr": "*fp32", "scalars_ptr": "*fp32",
               "size_ptr": "*fp32", "weight_ptr": "*fp32", "codebook_ptr": "*fp32",
               "x_ptr": PTR[x_dtype] if reseed else "*fp32",
               "seed_ptr": "*i64" if reseed else "*fp32", "decay_weight_ptr": "*fp32",
               "reseeded_ptr": "*i64" if reseed else "*fp32",
               "K": "i32", "D": "i32", "N": "i32", "S": "i32", "decay": "fp32",
               "epsilon": "fp32", "threshold": "fp32", "start": "fp32"}
        for rule in (0, 1, 2) if not reseed else (0,):
            yield (f"ema_finalize[D{cfg['BLOCK_D']},reseed={x_dtype},size_rule={rule}]",
                   _ema_finalize_kernel, sig,
                   dict(cfg, RESEED=reseed, STATS_SEM=_launch.STATS_SEM, SIZE_RULE=rule), options)
    # an fp32 codebook, or one cast with the module (.half(), .bfloat16())
    dtypes = [(x, "fp32") for x in PTR] + [("fp16", "fp16"), ("bf16", "bf16")]
    for (cfg, options), (x_dtype, book_dtype) in itertools.product(streaming_configs(CONFIG),
                                                                    dtypes):
        sig = {"size_ptr": "*fp32", "decay_weight_ptr": "*fp32", "codebook_ptr": PTR[book_dtype],
               "x_ptr": PTR[x_dtype], "seed_ptr": "*i64", "reseeded_ptr": "*i64", "K": "i32",
               "D": "i32", "N": "i32", "S": "i32", "threshold": "fp32", "start": "fp32"}
        yield (f"reseed_codes[D{cfg['BLOCK_D']},x={x_dtype},codebook={book_dtype}]",
               _reseed_codes_kernel, sig, dict(cfg, STATS_SEM=_launch.STATS_SEM), options)
