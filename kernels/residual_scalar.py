"""Residual FSQ / residual LFQ: every level of every group in one launch each way.

One program per (tile of ``BLOCK_N`` rows, group). Everything is per channel: level ``l``
quantizes the residual ``r_l = z - (q_0 + ... + q_{l-1})`` of a channel with the scalar
quantizer scaled by ``scales[l, c]``,

- FSQ: ``q = s * round(tanh(r / s + shift) * half_l - offset) / half_width``, digit
  ``round(...) + half_width``;
- LFQ (``SIGN``): ``q = s`` where ``r > 0`` else ``-s``, digit ``[r > 0]``;

so a channel's levels run back to back in registers: one read of z, one write of the sum
of the levels, the codes of every level (``digit * basis[c]`` added per channel) kept as a
``[BLOCK_N, BLOCK_Q]`` tile and written once. Levels ``l >= active`` (quantize dropout,
read on the device) add nothing and get code -1. ``STORE_RESIDUALS`` also writes each
level's input ``r_l`` as rows ``[G*Q, N, C]`` (LFQ's entropy terms read them).

The FSQ backward recomputes the residuals and sums each level's straight-through bound
derivative: ``grad_z = grad * sum_l (1 - tanh^2(r_l / s_l + shift)) * half_l / half_width``
(``STORE_SLOPE`` writes that sum from the forward instead, for callers that keep it).
"""

import torch
import triton
import triton.language as tl

from ._launch import launch, cdiv, PTR, check_same_device, launcher, next_power_of_2, split_options
from ._layout import row_offsets, vector_layout
from .fsq import _round_half_even, _tanh, channel_params

CONFIG = dict(BLOCK_N=128, num_warps=4)


@triton.jit
def _residual_scalar_forward_kernel(
    z_ptr, params_ptr, basis_ptr, scales_ptr, active_ptr, q_ptr, codes_ptr, residuals_ptr,
    slope_ptr, N, C, S, Q,
    SIGN: tl.constexpr, STORE_RESIDUALS: tl.constexpr, STORE_SLOPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    group = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    num_groups = tl.num_programs(1)
    active = tl.load(active_ptr)
    levels = tl.arange(0, BLOCK_Q)
    # channel g*C + c of each row: 64-bit offsets (G * C * S may pass 2**31 elements)
    offsets = row_offsets(rows, S, num_groups * C) + (group * C).to(tl.int64) * S
    codes = tl.zeros([BLOCK_N, BLOCK_Q], dtype=tl.int64)
    has_nan = tl.zeros([BLOCK_N], dtype=tl.int1)
    for c in range(0, C):
        r = tl.load(z_ptr + offsets, mask=row_mask, other=0.0).to(tl.float32)
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        slope = tl.zeros([BLOCK_N], dtype=tl.float32)
        basis = tl.load(basis_ptr + c)
        half_l, offset, shift, half_width = channel_params(params_ptr, C, c)
        for level in range(0, Q):
            s = tl.load(scales_ptr + level * C + c)
            if STORE_RESIDUALS:  # rows [G*Q, N, C]
                slot = group * Q + level
                tl.store(residuals_ptr + (slot.to(tl.int64) * N + rows) * C + c, r,
                         mask=row_mask)
            if SIGN:
                positive = r > 0.0
                q = tl.where(positive, s, -s)
                digit = positive.to(tl.int64)
            else:
                t = _tanh(r / s + shift)
                rounded = _round_half_even(t * half_l - offset)
                q = rounded / half_width * s
                if STORE_SLOPE:
                    slope += tl.where(level < active, (1.0 - t * t) * (half_l / half_width), 0.0)
                is_nan = rounded != rounded
                has_nan = has_nan | is_nan
                digit = tl.where(is_nan, 0.0, rounded + half_width).to(tl.int64)
            q = tl.where(level < active, q, 0.0)
            codes += tl.where(levels[None, :] == level, (digit * basis)[:, None], 0)
            total += q
            r = r - q
        tl.store(q_ptr + offsets, total.to(q_ptr.dtype.element_ty), mask=row_mask)
        if STORE_SLOPE:
            tl.store(slope_ptr + offsets, slope, mask=row_mask)
        offsets += S
    codes = tl.where(has_nan[:, None] | (levels[None, :] >= active), -1, codes)
    code_offsets = (group * Q + levels[None, :]).to(tl.int64) * N + rows[:, None]
    tl.store(codes_ptr + code_offsets, codes, mask=row_mask[:, None] & (levels[None, :] < Q))


@triton.jit
def _residual_fsq_backward_kernel(
    grad_q_ptr, z_ptr, params_ptr, scales_ptr, active_ptr, grad_z_ptr, N, C, S, Q,
    BLOCK_N: tl.constexpr,
):
    group = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    active = tl.load(active_ptr)
    offsets = row_offsets(rows, S, tl.num_programs(1) * C) + (group * C).to(tl.int64) * S
    for c in range(0, C):
        r = tl.load(z_ptr + offsets, mask=row_mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_q_ptr + offsets, mask=row_mask, other=0.0).to(tl.float32)
        half_l, offset, shift, half_width = channel_params(params_ptr, C, c)
        slope = tl.zeros([BLOCK_N], dtype=tl.float32)
        for level in range(0, Q):
            s = tl.load(scales_ptr + level * C + c)
            t = _tanh(r / s + shift)
            on = level < active
            slope += tl.where(on, (1.0 - t * t) * (half_l / half_width), 0.0)
            q = _round_half_even(t * half_l - offset) / half_width * s
            r = r - tl.where(on, q, 0.0)
        tl.store(grad_z_ptr + offsets, (grad * slope).to(grad_z_ptr.dtype.element_ty),
                 mask=row_mask)
        offsets += S


def _check(z, params, basis, scales, active, groups):
    n, channels, s = vector_layout("z", z)
    if groups < 1 or channels % groups:
        raise ValueError(f"z has {channels} channels, not divisible by groups={groups}")
    c = channels // groups
    if params.shape != (4, c) or params.dtype != torch.float32 or basis.shape != (c,) \
            or basis.dtype != torch.int64:
        raise ValueError(f"params must be fp32 [4, {c}] and basis int64 [{c}], got "
                         f"{params.dtype} {tuple(params.shape)} and {basis.dtype} "
                         f"{tuple(basis.shape)}")
    if scales.dim() != 2 or scales.shape[1] != c or scales.dtype != torch.float32 \
            or not scales.is_contiguous():
        raise ValueError(f"scales must be contiguous fp32 [Q, {c}], got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    if active.shape != () or active.dtype != torch.int64:
        raise ValueError(f"active must be an int64 scalar tensor, got {active.dtype} "
                         f"{tuple(active.shape)}")
    check_same_device(z=z, params=params, basis=basis, scales=scales, active=active)
    return n, c, s, scales.shape[0]


@launcher
def residual_scalar_forward(z, params, basis, scales, active, groups, sign, store_residuals,
                            store_slope=False):
    """``z: [N, G*C]`` or ``[B, G*C, S]`` -> ``quantized`` (z's layout and dtype: the sum of
    the levels), ``codes`` int64 ``[G*Q, N]`` (-1: a dropped level, or FSQ of a NaN input),
    ``residuals`` fp32 ``[G*Q, N, C]`` (each level's input; empty unless
    ``store_residuals``), ``slope`` fp32 in z's layout (FSQ: the summed bound derivative of
    the active levels, the backward's factor; empty unless ``store_slope``). ``sign``:
    LFQ's levels (``params`` unused) instead of FSQ's."""
    n, c, s, q_levels = _check(z, params, basis, scales, active, groups)
    slope = torch.empty(z.shape if store_slope else (0,), dtype=torch.float32, device=z.device)
    quantized = torch.empty_like(z)
    codes = torch.empty(groups * q_levels, n, dtype=torch.int64, device=z.device)
    residuals = torch.empty((groups * q_levels, n, c) if store_residuals else (0,),
                            dtype=torch.float32, device=z.device)
    grid = (cdiv(n, CONFIG["BLOCK_N"]), groups)
    launch(_residual_scalar_forward_kernel, grid,
        z, params, basis, scales, active, quantized, codes, residuals, slope, n, c, s, q_levels,
        SIGN=bool(sign), STORE_RESIDUALS=bool(store_residuals),
        STORE_SLOPE=bool(store_slope) and not sign, BLOCK_Q=next_power_of_2(q_levels), **CONFIG)
    return quantized, codes, residuals, slope


@launcher
def residual_fsq_backward(grad_q, z, params, scales, active, groups):
    """The straight-through gradient of every active level's bound: ``grad_z`` (z's layout
    and dtype)."""
    n, channels, s = vector_layout("z", z)
    if grad_q.shape != z.shape or not grad_q.is_contiguous():
        raise ValueError(f"grad_q must be contiguous with shape {tuple(z.shape)}, got "
                         f"{tuple(grad_q.shape)}")
    c = channels // groups
    grad_z = torch.empty_like(z)
    grid = (cdiv(n, CONFIG["BLOCK_N"]), groups)
    launch(_residual_fsq_backward_kernel, grid, grad_q, z, params, scales, active, grad_z, n, c, s,
                                        scales.shape[0], **CONFIG)
    return grad_z


def aot_variants():
    """Every launchable configuration, for the ahead-of-time compile test: the forward per
    dtype, FSQ and LFQ, with and without the residual rows, up to 16 levels."""
    consts, options = split_options(CONFIG)
    for dtype in PTR:
        sig = {"z_ptr": PTR[dtype], "params_ptr": "*fp32", "basis_ptr": "*i64",
               "scales_ptr": "*fp32", "active_ptr": "*i64", "q_ptr": PTR[dtype],
               "codes_ptr": "*i64", "residuals_ptr": "*fp32", "slope_ptr": "*fp32", "N": "i32",
               "C": "i32", "S": "i32", "Q": "i32"}
        for sign, block_q in ((False, 4), (False, 16), (True, 8), (True, 16)):
            flags = dict(consts, SIGN=sign, STORE_RESIDUALS=sign, STORE_SLOPE=block_q == 16 and not sign,
                         BLOCK_Q=block_q)
            name = f"{dtype},sign={sign},levels<={block_q},slope={flags['STORE_SLOPE']}"
            yield (f"residual_scalar_forward[{name}]",
                   _residual_scalar_forward_kernel, sig, flags, options)
        sig = {"grad_q_ptr": PTR[dtype], "z_ptr": PTR[dtype], "params_ptr": "*fp32",
               "scales_ptr": "*fp32", "active_ptr": "*i64", "grad_z_ptr": PTR[dtype],
               "N": "i32", "C": "i32", "S": "i32", "Q": "i32"}
        yield f"residual_fsq_backward[{dtype}]", _residual_fsq_backward_kernel, sig, consts, options
