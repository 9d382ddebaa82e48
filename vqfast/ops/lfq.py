"""LFQ's codebook entropy: custom ops over the streamed Triton kernels
(``vqfast.kernels.lfq_entropy``) or the torch backend's tiles, and its autograd.Function."""

from typing import Optional

import torch

from .dispatch import _impl, custom_op


@custom_op("lfq_avg_prob", mutates_args=())
def _lfq_avg_prob_op(x: torch.Tensor, lse: torch.Tensor, inv_temperature: float, backend: str,
                     precision: str) -> torch.Tensor:
    return _impl(backend).lfq_avg_prob(x, lse, inv_temperature, precision)


@_lfq_avg_prob_op.register_fake
def _(x, lse, inv_temperature, backend, precision):
    return x.new_empty((*x.shape[:-2], 2 ** x.shape[-1]), dtype=torch.float32)


@custom_op("lfq_entropy_backward", mutates_args=())
def _lfq_entropy_backward_op(x: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, coef: float,
                             inv_temperature: float, backend: str, precision: str) -> torch.Tensor:
    return _impl(backend).lfq_entropy_backward(x, lse, g, coef, inv_temperature, precision)


@_lfq_entropy_backward_op.register_fake
def _(x, lse, g, coef, inv_temperature, backend, precision):
    return torch.empty_like(x, dtype=torch.float32)


def log_partition(x: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """``lse_n = log sum_c exp(<l_n, c>) = sum_i logaddexp(l_i, -l_i)``, ``l = 2 * inv_temperature * x``:
    fp32 ``[N]`` (``[..., N]``) in closed form (the code distribution factorises over channels)."""
    l = x.float() * (2.0 * inv_temperature)
    return torch.logaddexp(l, -l).sum(-1)


class _CodebookEntropy(torch.autograd.Function):
    """``H(mean_n p(.|x_n))`` over all ``2**d`` codes, exactly, for ``x: [N, d]`` (0-d), or
    one per slot of a batch ``[slots, N, d]`` (``[slots]``, one launch each way); memory
    ``[2**d]`` per slot, never ``[N, 2**d]``. The backward streams the codes again."""

    @staticmethod
    def forward(ctx, x, inv_temperature, backend, precision):
        x = x.detach().contiguous()
        lse = log_partition(x, inv_temperature)
        avg = _lfq_avg_prob_op(x, lse, inv_temperature, backend, precision)
        ctx.save_for_backward(x, lse, avg)
        ctx.inv_temperature, ctx.backend, ctx.precision = inv_temperature, backend, precision
        return -torch.special.xlogy(avg, avg).sum(-1)

    @staticmethod
    def backward(ctx, grad_entropy):
        x, lse, avg = ctx.saved_tensors
        # dH/d avg[c] = -(log avg[c] + 1); where avg[c] underflows to 0 every p_n(c) is 0 too
        g = -(torch.log(avg.clamp_min(torch.finfo(torch.float32).tiny)) + 1)
        grad = _lfq_entropy_backward_op(x, lse, g, 1.0 / x.shape[-2], ctx.inv_temperature,
                                        ctx.backend, ctx.precision)
        return (grad * grad_entropy[..., None, None]).to(x.dtype), None, None, None


def codebook_entropy(x, inv_temperature, backend="torch", precision="ieee", batched=False):
    """Differentiable ``H(mean_n p(.|x_n))`` of ``x: [N, d]``, or with ``batched`` of each
    slot of ``[slots, N, d]`` (see ``_CodebookEntropy``)."""
    if x.dim() != (3 if batched else 2):
        raise ValueError(f"x must be {'[slots, N, d]' if batched else '[N, d] rows'}, got shape "
                         f"{tuple(x.shape)}")
    return _CodebookEntropy.apply(x, inv_temperature, backend, precision)


# --- quantization and the per-vector terms -------------------------------------------------

@custom_op("lfq_quantize", mutates_args=())
def _lfq_quantize_op(x: torch.Tensor, scale: float, commitment_cost: float,
                     entropy_weight: float, inv_temperature: float, backend: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor]:
    return _impl(backend).lfq_quantize(x, scale, commitment_cost, entropy_weight,
                                       inv_temperature)


@_lfq_quantize_op.register_fake
def _(x, scale, commitment_cost, entropy_weight, inv_temperature, backend):
    n = x.numel() // x.shape[1]
    scalar = x.new_empty((), dtype=torch.float32)
    return (torch.empty_like(x), scalar, scalar.clone(), x.new_empty(n, dtype=torch.int64),
            x.new_empty(2 ** x.shape[1], dtype=torch.int32))


@custom_op("lfq_quantize_backward", mutates_args=())
def _lfq_quantize_backward_op(grad_q: Optional[torch.Tensor], grad_commitment: torch.Tensor,
                              grad_entropy: torch.Tensor, x: torch.Tensor, scale: float,
                              commitment_cost: float, entropy_weight: float,
                              inv_temperature: float, backend: str) -> torch.Tensor:
    return _impl(backend).lfq_quantize_backward(grad_q, grad_commitment, grad_entropy, x, scale,
                                                commitment_cost, entropy_weight,
                                                inv_temperature)


@_lfq_quantize_backward_op.register_fake
def _(grad_q, grad_commitment, grad_entropy, x, scale, commitment_cost, entropy_weight,
      inv_temperature, backend):
    return torch.empty_like(x)


class _LFQQuantize(torch.autograd.Function):
    """``x: [N, d]`` or ``[B, d, S]`` -> ``(q, commitment, entropy, codes, counts)`` (see
    ``vqfast.kernels.lfq_quantize``): ``q``'s gradient flows straight through to ``x``,
    the two terms' through their closed forms; one pass each way."""

    @staticmethod
    def forward(ctx, x, scale, commitment_cost, entropy_weight, inv_temperature, backend):
        q, commitment, entropy, codes, counts = _lfq_quantize_op(
            x, scale, commitment_cost, entropy_weight, inv_temperature, backend)
        ctx.save_for_backward(x)
        ctx.options = (scale, commitment_cost, entropy_weight, inv_temperature, backend)
        ctx.mark_non_differentiable(codes, counts)
        ctx.set_materialize_grads(False)
        return q, commitment, entropy, codes, counts

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q, grad_commitment, grad_entropy, grad_codes, grad_counts):
        x, = ctx.saved_tensors
        scale, commitment_cost, entropy_weight, inv_temperature, backend = ctx.options
        commitment_cost, entropy_weight, grad_commitment, grad_entropy = _used_terms(
            x, commitment_cost, entropy_weight, grad_commitment, grad_entropy)
        grad_x = _lfq_quantize_backward_op(  # (no grad_q: q unused, the terms' gradients alone)
            None if grad_q is None else grad_q.contiguous(), grad_commitment, grad_entropy, x, scale, commitment_cost,
            entropy_weight, inv_temperature, backend)
        return grad_x, None, None, None, None, None


def _used_terms(x, commitment_cost, entropy_weight, grad_commitment, grad_entropy):
    """The weights and fp32 gradients of the two terms for a backward: a term that takes no
    gradient adds none (its weight 0: not even 0 * inf); a missing gradient is a stand-in."""
    if grad_commitment is None:
        commitment_cost, grad_commitment = 0.0, grad_entropy
    if grad_entropy is None:
        entropy_weight, grad_entropy = 0.0, grad_commitment
    if grad_commitment is None:  # neither: a placeholder scalar, never read
        grad_commitment = grad_entropy = x.new_zeros((), dtype=torch.float32)
    return commitment_cost, entropy_weight, grad_commitment.float(), grad_entropy.float()


def lfq_quantize(x, scale, commitment_cost, entropy_weight, inv_temperature, backend="torch"):
    """Differentiable LFQ of a contiguous ``x: [N, d]`` or ``[B, d, S]``: ``(q, commitment,
    entropy, codes, counts)`` (see ``_LFQQuantize``)."""
    return _LFQQuantize.apply(x, scale, commitment_cost, entropy_weight, inv_temperature,
                              backend)


# --- the terms of a batch of slots (residual LFQ's levels) ---------------------------------

@custom_op("lfq_terms", mutates_args=())
def _lfq_terms_op(x: torch.Tensor, slot_scale: torch.Tensor, slot_weight: torch.Tensor,
                  commitment_cost: float, entropy_weight: float, inv_temperature: float,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(backend).lfq_terms(x, slot_scale, slot_weight, commitment_cost, entropy_weight,
                                    inv_temperature)


@_lfq_terms_op.register_fake
def _(x, slot_scale, slot_weight, commitment_cost, entropy_weight, inv_temperature, backend):
    scalar = x.new_empty((), dtype=torch.float32)
    return scalar, scalar.clone()


@custom_op("lfq_terms_backward", mutates_args=())
def _lfq_terms_backward_op(grad_commitment: torch.Tensor, grad_entropy: torch.Tensor,
                           x: torch.Tensor, slot_scale: torch.Tensor, slot_weight: torch.Tensor,
                           commitment_cost: float, entropy_weight: float,
                           inv_temperature: float, backend: str) -> torch.Tensor:
    return _impl(backend).lfq_terms_backward(grad_commitment, grad_entropy, x, slot_scale,
                                             slot_weight, commitment_cost, entropy_weight,
                                             inv_temperature)


@_lfq_terms_backward_op.register_fake
def _(grad_commitment, grad_entropy, x, slot_scale, slot_weight, commitment_cost,
      entropy_weight, inv_temperature, backend):
    return torch.empty_like(x)


class _LFQTerms(torch.autograd.Function):
    """``x: [slots, N, d]`` -> ``(commitment, entropy)`` summed over the slots (see
    ``vqfast.kernels.lfq_terms``): one pass each way."""

    @staticmethod
    def forward(ctx, x, slot_scale, slot_weight, commitment_cost, entropy_weight,
                inv_temperature, backend):
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise ValueError("lfq_terms takes no gradient to slot_scale or slot_weight; pass "
                             "them detached")
        commitment, entropy = _lfq_terms_op(x, slot_scale, slot_weight, commitment_cost,
                                            entropy_weight, inv_temperature, backend)
        ctx.save_for_backward(x, slot_scale, slot_weight)
        ctx.options = (commitment_cost, entropy_weight, inv_temperature, backend)
        ctx.set_materialize_grads(False)
        return commitment, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_commitment, grad_entropy):
        x, slot_scale, slot_weight = ctx.saved_tensors
        commitment_cost, entropy_weight, inv_temperature, backend = ctx.options
        commitment_cost, entropy_weight, grad_commitment, grad_entropy = _used_terms(
            x, commitment_cost, entropy_weight, grad_commitment, grad_entropy)
        grad_x = _lfq_terms_backward_op(grad_commitment, grad_entropy, x, slot_scale,
                                        slot_weight, commitment_cost, entropy_weight,
                                        inv_temperature, backend)
        return grad_x, None, None, None, None, None, None


def lfq_terms(x, slot_scale, slot_weight, commitment_cost, entropy_weight, inv_temperature,
              backend="torch"):
    """Differentiable LFQ terms of a batch of slots ``x: [slots, N, d]`` (contiguous), slot
    ``l`` with codes ``±slot_scale[l]`` and weight ``slot_weight[l]``: ``(commitment,
    entropy)`` (see ``_LFQTerms``)."""
    return _LFQTerms.apply(x, slot_scale, slot_weight, commitment_cost, entropy_weight,
                           inv_temperature, backend)
