"""FSQ: custom ops over the Triton kernel (``vqfast.kernels.fsq``) or the torch backend,
and the straight-through ``torch.autograd.Function``."""

import torch

from .. import _torch
from .dispatch import _impl, custom_op


def fsq_params(levels, eps: float = 1e-3):
    """Per-channel constants of FSQ's bound for ``levels`` (ints >= 2): ``params`` fp32
    ``[4, C]`` (half_l, offset, shift, half_width) and the mixed-radix ``basis`` int64 ``[C]``."""
    levels = torch.as_tensor(levels, dtype=torch.int64)
    half_l = (levels - 1).double() * (1 + eps) / 2
    offset = (levels % 2 == 0).double() * 0.5
    shift = torch.atanh(offset / half_l)
    half_width = (levels // 2).double()
    params = torch.stack([half_l, offset, shift, half_width]).float()
    basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0)
    return params, basis


@custom_op("fsq_forward", mutates_args=())
def _fsq_forward_op(z: torch.Tensor, params: torch.Tensor, basis: torch.Tensor,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(backend).fsq_forward(z, params, basis)


@_fsq_forward_op.register_fake
def _(z, params, basis, backend):
    return torch.empty_like(z), z.new_empty(_torch.num_vectors(z), dtype=torch.int64)


@custom_op("fsq_backward", mutates_args=())
def _fsq_backward_op(grad_q: torch.Tensor, z: torch.Tensor, params: torch.Tensor,
                     backend: str) -> torch.Tensor:
    return _impl(backend).fsq_backward(grad_q, z, params)


@_fsq_backward_op.register_fake
def _(grad_q, z, params, backend):
    return torch.empty_like(z)


class _FSQ(torch.autograd.Function):
    """``z: [N, C]`` or ``[B, C, S]`` -> ``quantized`` (z's layout), ``codes [N]``; the
    gradient is the bound's (straight through the rounding)."""

    @staticmethod
    def forward(ctx, z, params, basis, backend):
        q, codes = _fsq_forward_op(z, params, basis, backend)
        ctx.save_for_backward(z, params)
        ctx.backend = backend
        ctx.mark_non_differentiable(codes)
        return q, codes

    @staticmethod
    def backward(ctx, grad_q, grad_codes):
        z, params = ctx.saved_tensors
        grad_z = _fsq_backward_op(grad_q.contiguous(), z, params, ctx.backend)
        return grad_z, None, None, None


def fsq(z, params, basis, backend="torch"):
    """Differentiable FSQ of a contiguous ``z: [N, C]`` or ``[B, C, S]``: ``(quantized, codes)``."""
    return _FSQ.apply(z, params, basis, backend)

