"""Residual FSQ / residual LFQ: custom ops over the fused Triton kernels
(``vqfast.kernels.residual_scalar``) or the torch backend, and FSQ's straight-through
``torch.autograd.Function``."""

import torch

from .. import _torch
from .dispatch import _impl, custom_op


def _num_levels(scales: torch.Tensor, groups: int) -> int:
    return groups * scales.shape[0]


@custom_op("residual_scalar_forward", mutates_args=())
def _residual_scalar_forward_op(
        z: torch.Tensor, params: torch.Tensor, basis: torch.Tensor, scales: torch.Tensor,
        active: torch.Tensor, groups: int, sign: bool, store_residuals: bool, store_slope: bool,
        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend).residual_scalar_forward(z, params, basis, scales, active, groups,
                                                  sign, store_residuals, store_slope)


@_residual_scalar_forward_op.register_fake
def _(z, params, basis, scales, active, groups, sign, store_residuals, store_slope, backend):
    n, slots = _torch.num_vectors(z), _num_levels(scales, groups)
    shape = (slots, n, params.shape[1]) if store_residuals else (0,)
    return (torch.empty_like(z), z.new_empty(slots, n, dtype=torch.int64),
            z.new_empty(shape, dtype=torch.float32),
            z.new_empty(z.shape if store_slope and not sign else (0,), dtype=torch.float32))


@custom_op("residual_fsq_backward", mutates_args=())
def _residual_fsq_backward_op(grad_q: torch.Tensor, z: torch.Tensor, params: torch.Tensor,
                              scales: torch.Tensor, active: torch.Tensor, groups: int,
                              backend: str) -> torch.Tensor:
    return _impl(backend).residual_fsq_backward(grad_q, z, params, scales, active, groups)


@_residual_fsq_backward_op.register_fake
def _(grad_q, z, params, scales, active, groups, backend):
    return torch.empty_like(z)


class _ResidualFSQ(torch.autograd.Function):
    """``z: [N, G*C]`` or ``[B, G*C, S]`` -> ``quantized`` (z's layout), ``codes [G*Q, N]``;
    the gradient is the sum of the active levels' bound gradients: recomputed from z by
    the fused backward on the Triton path; kept from the forward on the torch path (where
    the recomputed tanh would cost as much as the forward)."""

    @staticmethod
    def forward(ctx, z, params, basis, scales, active, groups, backend):
        keep = backend == "torch"
        q, codes, _, slope = _residual_scalar_forward_op(
            z, params, basis, scales, active, groups, False, False, keep, backend)
        ctx.save_for_backward(slope if keep else z, params, scales, active)
        ctx.groups, ctx.backend, ctx.keep = groups, backend, keep
        ctx.mark_non_differentiable(codes)
        return q, codes

    @staticmethod
    def backward(ctx, grad_q, grad_codes):
        saved, params, scales, active = ctx.saved_tensors
        if ctx.keep:
            grad_z = (grad_q.float() * saved).to(grad_q.dtype)
        else:
            grad_z = _residual_fsq_backward_op(grad_q.contiguous(), saved, params,
                                                             scales, active, ctx.groups,
                                                             ctx.backend)
        return grad_z, None, None, None, None, None, None


def residual_fsq(z, params, basis, scales, active, groups=1, backend="torch"):
    """Differentiable residual FSQ of a contiguous ``z: [N, G*C]`` or ``[B, G*C, S]``, all
    levels of all groups in one launch: ``(quantized, codes [G*Q, N])``. ``scales [Q, C]``:
    level ``l`` quantizes ``r_l / scales[l]``; ``active``: an int64 0-d tensor, the levels
    run (the rest give code -1)."""
    return _ResidualFSQ.apply(z, params, basis, scales, active, groups, backend)


def residual_sign_levels(z, basis, scales, active, groups=1, store_residuals=True,
                         backend="torch"):
    """Residual LFQ's levels of ``z`` in one launch, no autograd: ``(sum of the levels
    (z's layout and dtype), codes [G*Q, N], residuals fp32 [G*Q, N, C])``."""
    params = scales.new_zeros(4, scales.shape[1])
    return _residual_scalar_forward_op(z.detach(), params, basis, scales, active,
                                                    groups, True, store_residuals, False,
                                                    backend)[:3]
