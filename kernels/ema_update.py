"""EMA codebook update, finalize: one pass over K given this batch's counts and sums.

``size = decay * size + (1 - decay) * count``; Laplace smoothing with the total ``n``:
``size = (size + eps) / (n + K * eps) * n``; ``ema_weight = decay * ema_weight +
(1 - decay) * code_sums``; ``codebook = ema_weight / size``. All in place, fp32 math,
and only where the device-side flag ``apply`` is set (see ``vqfast.functional``).
"""

import torch
import triton
import triton.language as tl

from ._checks import launch_config, streaming_configs

CONFIG = dict(BLOCK_K=32, MAX_BLOCK_D=64, num_warps=4)


@triton.jit
def _ema_finalize_kernel(
    counts_ptr, code_sums_ptr, total_ptr, apply_ptr, size_ptr, weight_ptr, codebook_ptr,
    K, D, decay, epsilon,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    # Not applied: an empty code range, so nothing below stores.
    code_mask = codes < tl.where(tl.load(apply_ptr) != 0, K, 0)
    total = tl.load(total_ptr)
    count = tl.load(counts_ptr + codes, mask=code_mask, other=0).to(tl.float32)
    size = tl.load(size_ptr + codes, mask=code_mask, other=0.0).to(tl.float32)
    size = size * decay + (1.0 - decay) * count
    size = (size + epsilon) / (total + K * epsilon) * total
    tl.store(size_ptr + codes, size.to(size_ptr.dtype.element_ty), mask=code_mask)

    code_offsets = codes.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = code_mask[:, None] & (dims[None, :] < D)
        offsets = code_offsets + dims[None, :]
        weight = tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        sums = tl.load(code_sums_ptr + offsets, mask=mask, other=0.0)
        weight = weight * decay + (1.0 - decay) * sums
        tl.store(weight_ptr + offsets, weight.to(weight_ptr.dtype.element_ty), mask=mask)
        tl.store(codebook_ptr + offsets, (weight / size[:, None]).to(codebook_ptr.dtype.element_ty),
                 mask=mask)


def ema_update(counts, code_sums, total, apply, ema_cluster_size, ema_weight, codebook, decay,
               epsilon):
    """In place on ``ema_cluster_size [K]``, ``ema_weight [K, D]``, ``codebook [K, D]``.

    ``counts``: int32 ``[K]``; ``code_sums``: fp32 ``[K, D]``; ``total``: fp32 0-d, the
    ``n`` of the smoothing; ``apply``: 0-d bool, the update happens only where it is true.
    Both are read on the device: no host sync.
    """
    k, d = codebook.shape
    for name, t in (("ema_cluster_size", ema_cluster_size), ("ema_weight", ema_weight),
                    ("codebook", codebook), ("code_sums", code_sums)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if ema_weight.shape != (k, d) or code_sums.shape != (k, d) or ema_cluster_size.shape != (k,):
        raise ValueError(f"EMA state shapes disagree with codebook [{k}, {d}]: ema_weight "
                         f"{tuple(ema_weight.shape)}, code_sums {tuple(code_sums.shape)}, "
                         f"ema_cluster_size {tuple(ema_cluster_size.shape)}")
    config = launch_config(CONFIG, d)
    grid = (triton.cdiv(k, config["BLOCK_K"]),)
    _ema_finalize_kernel[grid](
        counts, code_sums, total.reshape(1), apply.to(torch.int32).reshape(1), ema_cluster_size,
        ema_weight, codebook,
        k, d, float(decay), float(epsilon), **config)


def aot_variants():
    """Every launchable configuration, for the ahead-of-time compile test."""
    for cfg, options in streaming_configs(CONFIG):
        sig = {"counts_ptr": "*i32", "code_sums_ptr": "*fp32", "total_ptr": "*fp32",
               "apply_ptr": "*i32", "size_ptr": "*fp32", "weight_ptr": "*fp32",
               "codebook_ptr": "*fp32", "K": "i32", "D": "i32", "decay": "fp32", "epsilon": "fp32"}
        yield f"ema_finalize[D{cfg['BLOCK_D']}]", _ema_finalize_kernel, sig, cfg, options
