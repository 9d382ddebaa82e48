"""FSQ: the bounded rounding and its backward."""

import torch

from ._common import _as_bds


# --- FSQ --------------------------------------------------------------------------------

def _fsq_constants(params: torch.Tensor, c: int):
    """``params [4, C]`` (half_l, offset, shift, half_width) as ``[1, C, 1]`` broadcasts."""
    return [p.view(1, c, 1) for p in params]


def fsq_forward(z: torch.Tensor, params: torch.Tensor, basis: torch.Tensor):
    """``z: [N, C]`` or ``[B, C, S]`` -> ``quantized`` (z's layout and dtype), ``codes`` (int64 [N],
    -1 where z has a NaN)."""
    z3 = _as_bds(z)
    c = z3.shape[1]
    half_l, offset, shift, half_width = _fsq_constants(params, c)
    rounded = torch.round(torch.tanh(z3.float() + shift) * half_l - offset)
    q = (rounded / half_width).to(z.dtype).view(z.shape)
    nan = rounded.isnan()
    codes = ((rounded + half_width).masked_fill(nan, 0).long() * basis.view(1, c, 1)).sum(1)
    return q, codes.masked_fill(nan.any(1), -1).reshape(-1)  # -1: the input had a NaN


def fsq_backward(grad_q: torch.Tensor, z: torch.Tensor, params: torch.Tensor):
    """Straight-through gradient of the bound: ``grad * (1 - tanh^2(z + shift)) * half_l / half_width``."""
    z3 = _as_bds(z)
    half_l, _, shift, half_width = _fsq_constants(params, z3.shape[1])
    t = torch.tanh(z3.float() + shift)
    grad = _as_bds(grad_q).float() * (1 - t * t) * (half_l / half_width)
    return grad.to(z.dtype).view(z.shape)
