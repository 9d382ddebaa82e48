"""Residual / grouped / cosine VQ: the custom ops (one forward running every level of
every group, one backward), their fakes, and the ``torch.autograd.Function``.

Single-codebook quantizers with the newer options (cosine codes, the rotation trick, a
mask) run here too, as one group of one level: one numeric rule, one place.
"""

import torch

from .. import _torch
from .dispatch import _impl, custom_op


@custom_op("residual_quantize", mutates_args=())
def _residual_quantize_op(x: torch.Tensor, codebooks: torch.Tensor, num_levels: int, groups: int,
                          cosine: bool, active: torch.Tensor | None, mask: torch.Tensor | None,
                          with_code_sums: bool, backend: str, precision: str,
                          raw_codes: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor, torch.Tensor]:
    impl = _impl(backend)
    # The backward keeps this fp32 copy when an EMA update follows (it rewrites the
    # codebooks): an output, so compilers cannot move the copy past the update.
    snapshot = (torch.empty(codebooks.shape, dtype=torch.float32, device=codebooks.device)
                if with_code_sums else codebooks.new_empty(0, dtype=torch.float32))
    q, idx, sq_err, counts, code_sums = impl.residual_quantize(
        x, codebooks, num_levels, groups, cosine, active, mask, with_code_sums, precision,
        snapshot if with_code_sums else None, raw_codes=raw_codes)
    if code_sums is None:
        code_sums = x.new_empty(0, dtype=torch.float32)
    return q, idx, sq_err, counts, code_sums, snapshot


@custom_op("residual_codes", mutates_args=())
def _residual_codes_op(x: torch.Tensor, codebooks: torch.Tensor, num_levels: int, groups: int,
                       cosine: bool, mask: torch.Tensor | None, backend: str,
                       precision: str, raw_codes: bool = False) -> torch.Tensor:
    return _impl(backend).residual_codes(x, codebooks, num_levels, groups, cosine, mask,
                                         precision, raw_codes)


@_residual_codes_op.register_fake
def _(x, codebooks, num_levels, groups, cosine, mask, backend, precision, raw_codes=False):
    return x.new_empty(groups * num_levels, _torch.num_vectors(x), dtype=torch.int64)


def residual_codes(x, codebooks, num_levels, *, groups=1, cosine=False, mask=None,
                   backend="torch", precision="ieee", raw_codes=False):
    """The codes alone of ``residual_quantize`` (no autograd, losses, counts or output):
    int64 ``[G*Q, N]``, -1 where ``mask`` is False. The search of an encoder."""
    return _residual_codes_op(x, codebooks.detach(), num_levels, groups, cosine, mask, backend,
                              precision, raw_codes)


@_residual_quantize_op.register_fake
def _(x, codebooks, num_levels, groups, cosine, active, mask, with_code_sums, backend, precision,
      raw_codes=False):
    n = _torch.num_vectors(x)
    slots, (_, k, d) = groups * num_levels, codebooks.shape
    sums_shape = (slots, k, d) if with_code_sums else (0,)
    return (torch.empty_like(x), x.new_empty(slots, n, dtype=torch.int64),
            x.new_empty(slots, dtype=torch.float32), x.new_empty(slots, k, dtype=torch.int32),
            x.new_empty(sums_shape, dtype=torch.float32),
            x.new_empty(tuple(codebooks.shape) if with_code_sums else (0,), dtype=torch.float32))


@custom_op("residual_backward", mutates_args=())
def _residual_backward_op(grad_q: torch.Tensor, grad_scale: torch.Tensor, x: torch.Tensor,
                          codebooks: torch.Tensor, idx: torch.Tensor, num_levels: int,
                          groups: int, cosine: bool, rotation_trick: bool, x_scale: float,
                          codebook_scale: float, backend: str, commit_levels: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x, grad_codebooks = _impl(backend).residual_backward(
        grad_q, grad_scale, x, codebooks, idx, num_levels, groups, cosine, rotation_trick,
        x_scale, codebook_scale, commit_levels)
    if grad_codebooks is None:
        grad_codebooks = x.new_empty(0, dtype=torch.float32)
    return grad_x, grad_codebooks


@_residual_backward_op.register_fake
def _(grad_q, grad_scale, x, codebooks, idx, num_levels, groups, cosine, rotation_trick, x_scale,
      codebook_scale, backend, commit_levels=None):
    shape = tuple(codebooks.shape) if codebook_scale != 0 else (0,)
    return torch.empty_like(x), x.new_empty(shape, dtype=torch.float32)


@custom_op("level_perplexity", mutates_args=())
def _level_perplexity_op(counts: torch.Tensor, backend: str) -> torch.Tensor:
    return _impl(backend).level_perplexity(counts)


@_level_perplexity_op.register_fake
def _(counts, backend):
    return counts.new_empty(counts.shape[0], dtype=torch.float32)


class _ResidualQuantize(torch.autograd.Function):
    """``x: [B, D, S]`` (or ``[N, D]``), ``codebooks: [G * C, K, D / G]`` -> ``(q, loss, idx
    [G*Q, N], perplexity [G*Q], counts [G*Q, K], code_sums, snapshot)``; see
    ``vqfast.reference.residual_vq`` for the definition (its reference implementation).

    ``loss = (codebook_loss + commitment_cost) * sum_{g,l} sq_err / (n_valid * D)``; the
    backward gathers the codes again from ``codebooks`` (the fp32 snapshot when an EMA
    update follows), so it saves ``idx`` and x, not the residuals. ``commit_levels``: the
    commitment terms of only each group's first ``commit_levels`` levels reach x (None: all).
    ``raw_codes``: the search is cosine, the codes, residuals and losses raw (``cosine`` is
    then unread; the gradients are those of the plain residual VQ).
    """

    @staticmethod
    def forward(ctx, x, codebooks, num_levels, groups, cosine, active, mask, commitment_cost,
                codebook_loss, rotation_trick, with_code_sums, backend, precision,
                commit_levels=None, raw_codes=False):
        dim = x.shape[1]
        q, idx, sq_err, counts, code_sums, snapshot = _residual_quantize_op(
            x, codebooks.detach(), num_levels, groups, cosine, active, mask, with_code_sums,
            backend, precision, raw_codes)
        cosine = cosine and not raw_codes  # (the backward's rule)
        # Rows that count: a device value with a mask (no host sync), else a constant.
        n_valid = (mask.sum().clamp_min(1).float() if mask is not None
                   else float(_torch.num_vectors(x)))
        loss = (float(codebook_loss) + commitment_cost) * sq_err.sum() / (n_valid * dim)
        ctx.save_for_backward(x, snapshot if with_code_sums else codebooks.detach(), idx,
                              n_valid if mask is not None else None)
        ctx.n_valid = n_valid if mask is None else None
        ctx.options = (num_levels, groups, cosine, rotation_trick, backend, commit_levels)
        ctx.x_scale = 2.0 * commitment_cost / dim
        ctx.codebook_scale = 2.0 / dim if codebook_loss else 0.0
        ctx.mark_non_differentiable(idx, counts, code_sums, snapshot)
        ctx.set_materialize_grads(False)
        return (q, loss, idx, _level_perplexity_op(counts, backend), counts, code_sums,
                snapshot)

    @staticmethod
    def backward(ctx, grad_q, grad_loss, *_):
        x, codebooks, idx, n_valid = ctx.saved_tensors
        n_valid = n_valid if n_valid is not None else ctx.n_valid
        num_levels, groups, cosine, rotation_trick, backend, commit_levels = ctx.options
        if grad_q is None:
            grad_q = torch.zeros_like(x)
        codebook_scale = ctx.codebook_scale if ctx.needs_input_grad[1] else 0.0
        if grad_loss is None:
            grad_loss = torch.zeros((), dtype=torch.float32, device=x.device)
            codebook_scale = 0.0
        grad_x, grad_codebooks = _residual_backward_op(
            grad_q.contiguous(), grad_loss.float() / n_valid, x, codebooks, idx, num_levels,
            groups, cosine, rotation_trick, ctx.x_scale, codebook_scale, backend,
            commit_levels)
        return (grad_x, grad_codebooks if codebook_scale != 0 else None,
                *([None] * 13))


def residual_quantize(x, codebooks, num_levels, *, groups=1, cosine=False, active=None,
                      mask=None, commitment_cost=0.25, codebook_loss=False, rotation_trick=False,
                      with_code_sums=False, backend="torch", precision="ieee",
                      commit_levels=None, raw_codes=False):
    """Differentiable residual VQ of a contiguous ``x: [N, D]`` or ``[B, D, S]``; see
    ``_ResidualQuantize``."""
    return _ResidualQuantize.apply(x, codebooks, num_levels, groups, cosine, active, mask,
                                   commitment_cost, codebook_loss, rotation_trick,
                                   with_code_sums, backend, precision, commit_levels,
                                   raw_codes)


@custom_op("residual_reseed", mutates_args=("size", "codebooks", "ema_weight", "reseeded"))
def _residual_reseed_op(z: torch.Tensor, idx: torch.Tensor, snapshot: torch.Tensor,
                        picks: torch.Tensor, size: torch.Tensor, decay_weight: torch.Tensor,
                        applied: torch.Tensor, codebooks: torch.Tensor, ema_weight: torch.Tensor,
                        reseeded: torch.Tensor, real_codes: torch.Tensor | None, threshold: float,
                        groups: int, num_levels: int, shared: bool, cosine: bool,
                        backend: str) -> None:
    _impl(backend).residual_reseed(z, idx, snapshot, picks, size, decay_weight, applied,
                                   codebooks, ema_weight, reseeded, real_codes, threshold, groups,
                                   num_levels, shared, cosine)


@_residual_reseed_op.register_fake
def _(z, idx, snapshot, picks, size, decay_weight, applied, codebooks, ema_weight, reseeded,
      real_codes, threshold, groups, num_levels, shared, cosine, backend):
    return None


def residual_reseed(z, idx, snapshot, picks, size, decay_weight, applied, codebooks, ema_weight,
                    reseeded, real_codes, threshold, *, groups, num_levels, shared, cosine,
                    backend="torch"):
    """``ResidualVQ``'s dead-code re-seeding, in place (one launch on the Triton backend):
    see ``vqfast._torch.residual_vq.residual_reseed``."""
    _residual_reseed_op(z, idx, snapshot, picks, size, decay_weight, applied, codebooks,
                        ema_weight, reseeded, real_codes, threshold, groups, num_levels, shared,
                        cosine, backend)
