"""Residual FSQ and residual LFQ: every level in one pass, and the FSQ backward."""

import torch

from ._common import _as_bds


# --- residual FSQ / residual LFQ ----------------------------------------------------------

def _residual_levels(z, params, scales, groups):
    """``z`` as fp32 ``[B, G, C, S]`` (a copy: the levels update it in place), FSQ's
    per-channel constants as ``[C, 1]`` broadcasts, and per level ``(1 / scale, scale)``."""
    z3 = _as_bds(z)
    b, channels, s = z3.shape
    c = channels // groups
    consts = [p.view(c, 1) for p in params]
    r = z3.to(torch.float32, copy=True).view(b, groups, c, s)
    return r, consts, [(sc.reciprocal().view(c, 1), sc.view(c, 1)) for sc in scales]


def _fsq_level(r, inv_scale, shift, half_l, offset):
    """``tanh(r / s + shift)`` and its rounded bound ``round(t * half_l - offset)``."""
    t = torch.addcmul(shift, r, inv_scale).tanh_()
    return t, (t * half_l).sub_(offset).round_()


def residual_scalar_forward(z, params, basis, scales, active, groups, sign, store_residuals,
                            store_slope=False):
    """``z: [N, G*C]`` or ``[B, G*C, S]`` -> ``quantized`` (z's layout and dtype: the sum of
    the levels), ``codes`` int64 ``[G*Q, N]`` (-1: a dropped level, or FSQ of a NaN input),
    ``residuals`` fp32 ``[G*Q, N, C]`` (each level's input; empty unless
    ``store_residuals``), ``slope`` fp32 in z's layout (FSQ: the summed bound derivative of
    the active levels; empty unless ``store_slope``). ``sign``: LFQ's levels (``params``
    unused) instead of FSQ's."""
    r, (half_l, offset, shift, half_width), level_scales = _residual_levels(z, params, scales, groups)
    b, _, c, s = r.shape
    nan = r.isnan().any(2) if not sign else None  # FSQ: a NaN input stays NaN at every level
    total = torch.zeros_like(r)
    slope = torch.zeros_like(r) if store_slope and not sign else None
    codes, residuals = [], []
    place = basis.to(torch.float64).view(c, 1)  # (codes sum exactly below 2**53)
    for level, (inv_scale, scale) in enumerate(level_scales):
        on = (level < active).float()
        if store_residuals:
            residuals.append(r.clone())
        if sign:
            positive = r > 0
            q = torch.where(positive, scale, -scale)
            digit = positive
        else:
            t, rounded = _fsq_level(r, inv_scale, shift, half_l, offset)
            q = rounded * (scale / half_width)
            if slope is not None:
                slope.add_(t.square_().neg_().add_(1.0).mul_(on * half_l / half_width))
            digit = rounded.add_(half_width)
        codes.append(torch.einsum("bgcs,c->bgs", digit.double(), place.view(-1)))  # [B, G, S]
        q.mul_(on)
        total.add_(q)
        r.sub_(q)
    level_on = torch.arange(len(level_scales), device=r.device) < active
    codes = torch.stack(codes, 2).long().masked_fill(~level_on.view(-1, 1), -1)  # [B, G, Q, S]
    if nan is not None:
        codes = codes.masked_fill(nan[:, :, None], -1)
    codes = codes.permute(1, 2, 0, 3).reshape(-1, b * s)
    if store_residuals:  # [B, G, C, S] per level -> rows [G*Q, N, C]
        rows = torch.stack(residuals, 2).permute(1, 2, 0, 4, 3).reshape(-1, b * s, c)
    else:
        rows = r.new_empty(0)
    shape = _as_bds(z).shape
    slope = r.new_empty(0) if slope is None else slope.view(shape).view(z.shape)
    return total.view(shape).to(z.dtype).view(z.shape), codes, rows.contiguous(), slope


def residual_fsq_backward(grad_q, z, params, scales, active, groups):
    """The straight-through gradient of every active level's bound: ``grad_z`` (z's layout
    and dtype)."""
    r, (half_l, offset, shift, half_width), level_scales = _residual_levels(z, params, scales, groups)
    slope = torch.zeros_like(r)
    for level, (inv_scale, scale) in enumerate(level_scales):
        on = (level < active).float()
        t, rounded = _fsq_level(r, inv_scale, shift, half_l, offset)
        slope.add_(t.square_().neg_().add_(1.0).mul_(on * half_l / half_width))
        r.sub_(rounded.mul_(on * scale / half_width))
    grad = _as_bds(grad_q).float().view(r.shape) * slope
    return grad.view(_as_bds(z).shape).to(z.dtype).view(z.shape)
