"""Deterministic per-code sums of rows: sort the rows by code, then one program per
(code, channel block) adds its segment in a fixed order. Used where fp32 atomics would
make results depend on scheduling (``torch.use_deterministic_algorithms(True)``).
"""

import torch
import triton
import triton.language as tl

from ._checks import launch_config
from ._layout import row_offsets, vector_layout

CONFIG = dict(BLOCK_N=32, MAX_BLOCK_D=64, num_warps=4)


@triton.jit
def _code_sums_sorted_kernel(
    x_ptr, q_ptr, order_ptr, offsets_ptr, scale_ptr, out_ptr,
    D, S,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_Q: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    code = tl.program_id(0)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    start = tl.load(offsets_ptr + code)
    end = tl.load(offsets_ptr + code + 1)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_N):
        slots = r0 + tl.arange(0, BLOCK_N)
        slot_mask = slots < end
        rows = tl.load(order_ptr + slots, mask=slot_mask, other=0)
        offsets = row_offsets(rows, S, D)[:, None] + dims[None, :] * S
        mask = slot_mask[:, None] & dim_mask[None, :]
        value = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_Q:  # sum of (q - x): the codebook gradient
            value = tl.load(q_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - value
        acc += value
    total = tl.sum(acc, axis=0)
    if HAS_SCALE:
        total = total * tl.load(scale_ptr)
    tl.store(out_ptr + code.to(tl.int64) * D + dims, total, mask=dim_mask)


def code_sums_sorted(x, idx, counts, q=None, scale=None):
    """``out[k] = scale * sum_{idx[n] == k} (q[n] - x[n] if q is given else x[n])``, fp32 ``[K, D]``.

    ``counts`` (int32 ``[K]``) must be the histogram of ``idx``; ``scale`` is a 0-d fp32
    tensor (read on the device, no host sync) or ``None`` for 1. ``x`` (and ``q``, same
    layout) are ``[N, D]`` or ``[B, D, S]``.
    """
    n, d, s = vector_layout("x", x)
    k = counts.shape[0]
    order = torch.sort(idx, stable=True).indices
    offsets = torch.zeros(k + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    out = torch.empty(k, d, dtype=torch.float32, device=x.device)
    config = launch_config(CONFIG, d)
    grid = (k, triton.cdiv(d, config["BLOCK_D"]))
    _code_sums_sorted_kernel[grid](
        x, q if q is not None else x, order, offsets, scale if scale is not None else out, out, d, s,
        HAS_Q=q is not None, HAS_SCALE=scale is not None, **config)
    return out
