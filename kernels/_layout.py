"""The vectors' memory layout, shared by the launchers and the kernels.

Inputs come as ``[N, D]`` rows or as channels-first ``[B, D, S]`` (S = the flattened
spatial size): vector ``n = b * S + s`` has channel ``d`` at ``b * D * S + s + d * S``.
``[N, D]`` is the case ``B = N, S = 1``. Reading the module's channels-first tensors in
place spares the flatten copy, the output copy and both gradient copies.
"""

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_DTYPES


def vector_layout(name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES):
    """``(N, D, S)`` of a contiguous ``[N, D]`` or ``[B, D, S]`` tensor; raises otherwise."""
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must be [N, D] or channels-first [B, D, S], got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)})")
    if t.dim() == 2:
        return t.shape[0], t.shape[1], 1
    b, d, s = t.shape
    return b * s, d, s


def check_item_offsets(name: str, d: int, s: int) -> None:
    """For kernels that index within one batch item with 32-bit offsets (``c * S``: 64-bit
    there would cost registers, and spills): ``D * S`` below 2**31 elements."""
    if d * s >= 2**31:
        raise ValueError(f"{name}: one batch item has D * S = {d} * {s} = {d * s} elements; "
                         f"at most 2**31 - 1 are supported (split the spatial dims into more "
                         f"batch items, or pass [N, D] rows)")


def same_layout(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.shape != like.shape or not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous with shape {tuple(like.shape)}, got "
                         f"{tuple(t.shape)} (strides {t.stride()})")


@triton.jit
def row_offsets(rows, S, D):
    """Element offset of channel 0 of each vector in ``rows`` (int64)."""
    rows = rows.to(tl.int64)
    return (rows // S) * D * S + rows % S
