"""Finite scalar quantization (Mentzer et al., 2023): one elementwise kernel each way.

Forward, per vector (all C channels of one position): bound each channel with
``tanh(z + shift) * half_l - offset``, round (half to even, as ``torch.round``), store
``round / half_width`` and add ``(round + half_width) * basis`` into the code (mixed
radix, the first channel least significant). Backward: the straight-through gradient of
the bound, ``grad * (1 - tanh^2(z + shift)) * half_l / half_width``, recomputed from z.
Per-channel constants come precomputed as ``params`` (fp32 ``[4, C]``: half_l, offset,
shift, half_width) and ``basis`` (int64 ``[C]``).
"""

import torch
import triton
import triton.language as tl

from ._launch import launch, cdiv, launcher, PTR, check_same_device, split_options
from ._layout import row_offsets, same_layout, vector_layout

CONFIG = dict(BLOCK_N=256, num_warps=4)


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _round_half_even(x):
    """As ``torch.round``: to the nearest integer, ties to even."""
    r = tl.floor(x + 0.5)
    odd = r - 2.0 * tl.floor(r * 0.5) != 0.0
    return tl.where((r - x == 0.5) & odd, r - 1.0, r)


@triton.jit
def channel_params(params_ptr, C, c):
    """Channel ``c``'s constants from ``params`` fp32 ``[4, C]``: half_l, offset, shift,
    half_width."""
    return (tl.load(params_ptr + c), tl.load(params_ptr + C + c), tl.load(params_ptr + 2 * C + c),
            tl.load(params_ptr + 3 * C + c))


@triton.jit
def _fsq_forward_kernel(
    z_ptr, params_ptr, basis_ptr, q_ptr, codes_ptr, N, C, S,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    # Channel c of each row: the pointers step by S per channel (64-bit pointers: C * S
    # may pass 2**31 elements).
    offsets = row_offsets(rows, S, C)
    z_ptrs, q_ptrs = z_ptr + offsets, q_ptr + offsets
    code = tl.zeros([BLOCK_N], dtype=tl.int64)
    has_nan = tl.zeros([BLOCK_N], dtype=tl.int1)
    for c in range(0, C):
        z = tl.load(z_ptrs, mask=row_mask, other=0.0).to(tl.float32)
        half_l, offset, shift, half_width = channel_params(params_ptr, C, c)
        rounded = _round_half_even(_tanh(z + shift) * half_l - offset)
        tl.store(q_ptrs, (rounded / half_width).to(q_ptr.dtype.element_ty), mask=row_mask)
        is_nan = rounded != rounded
        has_nan = has_nan | is_nan
        code += tl.where(is_nan, 0.0, rounded + half_width).to(tl.int64) * tl.load(basis_ptr + c)
        z_ptrs += S
        q_ptrs += S
    tl.store(codes_ptr + rows, tl.where(has_nan, -1, code), mask=row_mask)  # -1: a NaN input


@triton.jit
def _fsq_backward_kernel(
    grad_q_ptr, z_ptr, params_ptr, grad_z_ptr, N, C, S,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    offsets = row_offsets(rows, S, C)
    z_ptrs, grad_q_ptrs, grad_z_ptrs = z_ptr + offsets, grad_q_ptr + offsets, grad_z_ptr + offsets
    for c in range(0, C):
        z = tl.load(z_ptrs, mask=row_mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_q_ptrs, mask=row_mask, other=0.0).to(tl.float32)
        half_l, _, shift, half_width = channel_params(params_ptr, C, c)
        t = _tanh(z + shift)
        tl.store(grad_z_ptrs,
                 (grad * (1.0 - t * t) * (half_l / half_width)).to(grad_z_ptr.dtype.element_ty),
                 mask=row_mask)
        z_ptrs += S
        grad_q_ptrs += S
        grad_z_ptrs += S


def _check_params(z, params, basis):
    n, c, s = vector_layout("z", z)
    if params.shape != (4, c) or params.dtype != torch.float32 or basis.shape != (c,):
        raise ValueError(f"params must be fp32 [4, {c}] and basis [{c}], got "
                         f"{params.dtype} {tuple(params.shape)} and {tuple(basis.shape)}")
    return n, c, s


@launcher
def fsq_forward(z, params, basis):
    """``z: [N, C]`` or ``[B, C, S]`` -> ``quantized`` (z's layout and dtype), ``codes`` (int64 [N],
    -1 where z has a NaN)."""
    n, c, s = _check_params(z, params, basis)
    check_same_device(z=z, params=params, basis=basis)
    q = torch.empty_like(z)
    codes = torch.empty(n, dtype=torch.int64, device=z.device)
    launch(_fsq_forward_kernel, (cdiv(n, CONFIG["BLOCK_N"]),),
        z, params, basis, q, codes, n, c, s, **CONFIG)
    return q, codes


@launcher
def fsq_backward(grad_q, z, params):
    """The straight-through gradient of the bound: ``grad_z`` (z's layout and dtype)."""
    n, c, s = vector_layout("z", z)
    same_layout("grad_q", grad_q, z)
    grad_z = torch.empty_like(z)
    launch(_fsq_backward_kernel, (cdiv(n, CONFIG["BLOCK_N"]),),
        grad_q, z, params, grad_z, n, c, s, **CONFIG)
    return grad_z


def aot_variants():
    """Every launchable configuration, for the ahead-of-time compile test."""
    consts, options = split_options(CONFIG)
    for dtype in PTR:
        sig = {"z_ptr": PTR[dtype], "params_ptr": "*fp32", "basis_ptr": "*i64",
               "q_ptr": PTR[dtype], "codes_ptr": "*i64", "N": "i32", "C": "i32", "S": "i32"}
        yield f"fsq_forward[{dtype}]", _fsq_forward_kernel, sig, consts, options
        sig = {"grad_q_ptr": PTR[dtype], "z_ptr": PTR[dtype], "params_ptr": "*fp32",
               "grad_z_ptr": PTR[dtype], "N": "i32", "C": "i32", "S": "i32"}
        yield f"fsq_backward[{dtype}]", _fsq_backward_kernel, sig, consts, options
