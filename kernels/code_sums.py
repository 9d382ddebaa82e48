"""Deterministic per-code sums of rows: sort the rows by code, then one program per
(code, channel block) adds its segment in a fixed order. Used where fp32 atomics would
make results depend on scheduling (``torch.use_deterministic_algorithms(True)``).
"""

import itertools

import torch
import triton
import triton.language as tl

from ._launch import launch, cdiv, launcher, PTR, launch_config, streaming_configs
from ._layout import check_item_offsets, row_offsets, vector_layout

CONFIG = dict(BLOCK_N=32, MAX_BLOCK_D=64, num_warps=4)


@triton.jit
def _code_sums_sorted_kernel(
    x_ptr, codebook_ptr, order_ptr, offsets_ptr, scale_ptr, out_ptr,
    D, S,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_CODEBOOK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    code = tl.program_id(0)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    start = tl.load(offsets_ptr + code)
    end = tl.load(offsets_ptr + code + 1)
    if HAS_CODEBOOK:  # sums of (e_k - x) row by row: the codebook gradient, no cancellation
        code_row = tl.load(codebook_ptr + code.to(tl.int64) * D + dims, mask=dim_mask, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_N):
        slots = r0 + tl.arange(0, BLOCK_N)
        slot_mask = slots < end
        rows = tl.load(order_ptr + slots, mask=slot_mask, other=0)
        offsets = row_offsets(rows, S, D)[:, None] + dims[None, :] * S
        mask = slot_mask[:, None] & dim_mask[None, :]
        value = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_CODEBOOK:
            value = tl.where(mask, code_row[None, :] - value, 0.0)
        acc += value
    total = tl.sum(acc, axis=0)
    if HAS_SCALE:
        total = total * tl.load(scale_ptr)
    tl.store(out_ptr + code.to(tl.int64) * D + dims, total, mask=dim_mask)


@launcher
def code_sums_sorted(x, idx, num_codes, codebook=None, scale=None):
    """``out[k] = scale * sum_{idx[n] == k} (codebook[k] - x[n] if codebook is given else x[n])``,
    fp32 ``[K, D]``.

    ``num_codes`` is K; ``scale`` is a 0-d fp32
    tensor (read on the device, no host sync) or ``None`` for 1; ``codebook`` fp32 ``[K, D]``.
    ``x`` is ``[N, D]`` or ``[B, D, S]``.
    """
    n, d, s = vector_layout("x", x)
    check_item_offsets("x", d, s)
    k = num_codes
    sorted_idx, order = torch.sort(idx, stable=True)
    # Segment bounds by binary search: no histogram (bincount syncs with the host on CUDA).
    offsets = torch.searchsorted(sorted_idx, torch.arange(k + 1, device=x.device))
    out = torch.empty(k, d, dtype=torch.float32, device=x.device)
    config = launch_config(CONFIG, d)
    grid = (k, cdiv(d, config["BLOCK_D"]))
    launch(_code_sums_sorted_kernel, grid,
        x, codebook if codebook is not None else out, order, offsets,
        scale if scale is not None else out, out, d, s,
        HAS_CODEBOOK=codebook is not None, HAS_SCALE=scale is not None, **config)
    return out


def aot_variants():
    """Every launchable configuration, for the ahead-of-time compile test."""
    for dtype, (cfg, options), has_codebook in itertools.product(
            PTR, streaming_configs(CONFIG), (True, False)):
        sig = {"x_ptr": PTR[dtype], "codebook_ptr": "*fp32", "order_ptr": "*i64",
               "offsets_ptr": "*i64", "scale_ptr": "*fp32", "out_ptr": "*fp32", "D": "i32",
               "S": "i32"}
        yield (f"code_sums_sorted[{dtype},D{cfg['BLOCK_D']},codebook={has_codebook}]",
               _code_sums_sorted_kernel, sig,
               dict(cfg, HAS_CODEBOOK=has_codebook, HAS_SCALE=has_codebook), options)
