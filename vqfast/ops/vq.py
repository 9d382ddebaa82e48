"""The single-codebook VQ family: its custom ops (``torch.library``, namespace ``vqfast``,
with fake implementations so ``torch.compile(fullgraph=True)`` treats them as opaque calls),
the ``torch.autograd.Function`` the modules call, and the EMA update. Each op dispatches to
the Triton launchers in ``vqfast.kernels`` or to the torch backend in ``vqfast._torch``."""

import torch

from .. import _torch
from .dispatch import _impl, custom_op


@custom_op("nearest_code", mutates_args=())
def _nearest_code_op(x: torch.Tensor, codebook: torch.Tensor, backend: str,
                     precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(backend).nearest_code(x, codebook, precision)


@_nearest_code_op.register_fake
def _(x, codebook, backend, precision):
    n = _torch.num_vectors(x)
    return x.new_empty(n, dtype=torch.int64), x.new_empty(n, dtype=torch.float32)


@custom_op("quantize", mutates_args=("usage", "usage_weight", "usage_seed"))
def _quantize_op(x: torch.Tensor, codebook: torch.Tensor, with_code_sums: bool, loss_scale: float,
                 backend: str, precision: str, codebook_grad: bool = False,
                 usage: torch.Tensor | None = None, usage_weight: torch.Tensor | None = None,
                 usage_seed: torch.Tensor | None = None, usage_decay: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor, torch.Tensor]:
    impl = _impl(backend)
    k, d = codebook.shape
    # With the EMA statistics an update follows that rewrites the codebook: the backward
    # keeps this fp32 copy, taken in the same pass that prepares the codebook. (An output of
    # this op, so compilers cannot move the copy into the backward, past the update.)
    snapshot = (torch.empty((k, d), dtype=torch.float32, device=codebook.device)
                if with_code_sums else codebook.new_empty(0, dtype=torch.float32))
    # That pass also zeroes the accumulators (no fill launches of their own): the counts,
    # and the code sums or the codebook gradient's [K, D], which the backward adds into.
    rows = (torch.empty((k, d), dtype=torch.float32, device=x.device)
            if with_code_sums or codebook_grad else None)
    counts = torch.empty(k + 1, dtype=torch.int32, device=x.device)
    idx, _ = impl.nearest_code(x, codebook, precision, snapshot if with_code_sums else None,
                               (rows, counts))
    q, loss, perplexity, counts, code_sums = impl.gather_loss(
        x, codebook, idx, with_code_sums, loss_scale, rows if with_code_sums else None, counts,
        (usage, usage_weight, usage_seed, usage_decay) if usage is not None else None)
    if codebook_grad:
        code_sums = rows
    elif code_sums is None:
        code_sums = x.new_empty(0, dtype=torch.float32)
    return q, idx, loss, perplexity, counts, code_sums, snapshot


@_quantize_op.register_fake
def _(x, codebook, with_code_sums, loss_scale, backend, precision, codebook_grad=False,
      usage=None, usage_weight=None, usage_seed=None, usage_decay=0.0):
    n = _torch.num_vectors(x)
    sums_shape = tuple(codebook.shape) if with_code_sums or codebook_grad else (0,)
    scalar = x.new_empty((), dtype=torch.float32)
    return (torch.empty_like(x), x.new_empty(n, dtype=torch.int64), scalar, scalar.clone(),
            x.new_empty(codebook.shape[0], dtype=torch.int32),
            x.new_empty(sums_shape, dtype=torch.float32),
            x.new_empty(tuple(codebook.shape) if with_code_sums else (0,), dtype=torch.float32))


@custom_op("quantize_backward", mutates_args=("grad_codebook_out",))
def _quantize_backward_op(grad_q: torch.Tensor, grad_loss: torch.Tensor, x: torch.Tensor,
                          codebook: torch.Tensor, idx: torch.Tensor, x_scale: float,
                          codebook_scale: float, backend: str,
                          grad_codebook_out: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x, grad_codebook = _impl(backend).quantize_backward(
        grad_q, grad_loss, x, codebook, idx, x_scale, codebook_scale, grad_codebook_out)
    if grad_codebook is not None and grad_codebook_out is not None \
            and grad_codebook is not grad_codebook_out:  # (deterministic mode: sorted sums)
        grad_codebook_out.copy_(grad_codebook)
    if grad_codebook is None or grad_codebook_out is not None:
        grad_codebook = x.new_empty(0, dtype=torch.float32)
    return grad_x, grad_codebook


@_quantize_backward_op.register_fake
def _(grad_q, grad_loss, x, codebook, idx, x_scale, codebook_scale, backend,
      grad_codebook_out=None):
    into = codebook_scale == 0 or grad_codebook_out is not None
    return torch.empty_like(x), x.new_empty((0,) if into else tuple(codebook.shape),
                                            dtype=torch.float32)


@custom_op("ema_update",
           mutates_args=("ema_cluster_size", "ema_weight", "codebook", "ema_decay_weight",
                         "skipped_batches", "seed", "reseeded"))
def _ema_update_op(counts: torch.Tensor, code_sums: torch.Tensor, loss: torch.Tensor,
                   not_finite: torch.Tensor | None, ema_cluster_size: torch.Tensor,
                   ema_weight: torch.Tensor, codebook: torch.Tensor,
                   ema_decay_weight: torch.Tensor, skipped_batches: torch.Tensor, decay: float,
                   epsilon: float, backend: str, active: torch.Tensor | None = None,
                   num_codes: torch.Tensor | None = None, x: torch.Tensor | None = None,
                   seed: torch.Tensor | None = None, reseeded: torch.Tensor | None = None,
                   threshold: float = 0.0, size_rule: int = 0) -> torch.Tensor:
    return _impl(backend).ema_update(counts, code_sums, loss, not_finite, ema_cluster_size,
                                     ema_weight, codebook, ema_decay_weight, skipped_batches,
                                     decay, epsilon, active, num_codes, x, seed, reseeded,
                                     threshold, size_rule)


@_ema_update_op.register_fake
def _(counts, code_sums, loss, not_finite, ema_cluster_size, ema_weight, codebook,
      ema_decay_weight, skipped_batches, decay, epsilon, backend, active=None, num_codes=None,
      x=None, seed=None, reseeded=None, threshold=0.0, size_rule=0):
    return loss.new_empty(ema_decay_weight.shape, dtype=torch.float32)


@custom_op("reseed_codes", mutates_args=("size", "codebook", "reseeded"))
def _reseed_codes_op(size: torch.Tensor, decay_weight: torch.Tensor, codebook: torch.Tensor,
                     x: torch.Tensor, seed: torch.Tensor, reseeded: torch.Tensor,
                     threshold: float, backend: str) -> None:
    _impl(backend).reseed_codes(size, decay_weight, codebook, x, seed, reseeded, threshold)


@_reseed_codes_op.register_fake
def _(size, decay_weight, codebook, x, seed, reseeded, threshold, backend):
    return None


def reseed_codes(size, decay_weight, codebook, x, seed, reseeded, threshold, backend):
    """A learned codebook's dead-code re-seeding from random rows of ``x``, in place, one
    launch on the Triton backend (see ``vqfast.kernels.reseed_codes``)."""
    _reseed_codes_op(size, decay_weight, codebook, x, seed, reseeded, threshold, backend)


# --- autograd ---------------------------------------------------------------------------

class _Quantize(torch.autograd.Function):
    """``x: [N, D]`` or channels-first ``[B, D, S]`` (N = B * S), ``codebook: [K, D]`` ->
    ``q`` (x's layout), ``loss``, ``idx [N]``, ``perplexity``, ``counts [K]``,
    ``code_sums`` (fp32 ``[K, D]`` per-code sums of x for the EMA update when
    ``with_code_sums``, else an empty tensor, or, when the codebook takes a gradient, the
    zeroed accumulator the backward adds it into).

    ``loss = (codebook_loss + commitment_cost) * mse(q, x)`` (``codebook_loss``: the
    codebook term's weight, a bool or a float): the original notebook's
    ``q_latent_loss + commitment_cost * e_latent_loss`` for ``VectorQuantizer``
    (``codebook_loss=True``), ``commitment_cost * e_latent_loss`` for the EMA quantizer.
    The output's value is ``q``; its gradient flows straight through to ``x``.

    The backward gathers ``q`` again from the codebook in fp32 (saved: ``[K, D]``, not
    ``[N, D]``; a copy when ``with_code_sums``, since the EMA update then rewrites it).
    The codebook gets a gradient only when the loss is differentiated (else ``None``).
    """

    @staticmethod
    def forward(ctx, x, codebook, commitment_cost, codebook_loss, with_code_sums, backend,
                precision, usage):
        numel = x.numel()
        loss_scale = (float(codebook_loss) + commitment_cost) / numel
        codebook_grad = bool(codebook_loss) and ctx.needs_input_grad[1]
        q, idx, loss, perplexity, counts, code_sums, snapshot = _quantize_op(
            x, codebook.detach(), with_code_sums, loss_scale, backend, precision, codebook_grad,
            *(usage if usage is not None else (None, None, None, 0.0)))
        ctx.save_for_backward(x, snapshot if with_code_sums else codebook.detach(), idx)
        # zeroed in the forward's codebook pass; one backward adds into it (a second one,
        # with retain_graph, takes a new one)
        ctx.grad_codebook = code_sums if codebook_grad else None
        ctx.x_scale = 2.0 * commitment_cost / numel
        ctx.codebook_scale = 2.0 * float(codebook_loss) / numel
        ctx.backend = backend
        ctx.mark_non_differentiable(idx, perplexity, counts, code_sums)
        ctx.set_materialize_grads(False)  # an unused loss arrives as None: no codebook grad
        return q, loss, idx, perplexity, counts, code_sums

    @staticmethod
    def backward(ctx, grad_q, grad_loss, grad_idx, grad_perplexity, grad_counts, grad_code_sums):
        x, codebook, idx = ctx.saved_tensors
        if grad_q is None:
            grad_q = torch.zeros_like(x)
        codebook_scale = ctx.codebook_scale if ctx.needs_input_grad[1] else 0.0
        if grad_loss is None:  # no loss term reaches the codebook (nor x's commitment)
            grad_loss = torch.zeros((), dtype=torch.float32, device=x.device)
            codebook_scale = 0.0
        into = ctx.grad_codebook if codebook_scale != 0 else None
        ctx.grad_codebook = None
        grad_x, grad_codebook = _quantize_backward_op(
            grad_q.contiguous(), grad_loss.float(), x, codebook, idx, ctx.x_scale,
            codebook_scale, ctx.backend, into)
        if codebook_scale == 0:
            grad_codebook = None
        elif into is not None:
            grad_codebook = into
        return grad_x, grad_codebook, None, None, None, None, None, None


def quantize(x, codebook, commitment_cost, codebook_loss, with_code_sums=False, backend="torch",
             precision="ieee", usage=None):
    """Differentiable nearest-code quantization of a contiguous ``x: [N, D]`` or ``[B, D, S]``.

    Returns ``(q, loss, idx, perplexity, counts, code_sums)``; see ``_Quantize``.
    ``usage = (size, decay_weight, seed, decay)``: also move a learned codebook's usage EMA
    by this batch's counts, in place, in the same pass (``vqfast.kernels.gather_loss``).
    """
    return _Quantize.apply(x, codebook, commitment_cost, codebook_loss, with_code_sums, backend,
                           precision, usage)


def ema_update(counts, code_sums, loss, not_finite, ema_cluster_size, ema_weight, codebook,
               ema_decay_weight, skipped_batches, decay, epsilon, backend, active=None,
               num_codes=None, reseed=None, size_rule=0):
    """In-place EMA codebook update from this batch's ``counts [K]`` and ``code_sums [K, D]``,
    skipped (and counted in ``skipped_batches``) when ``loss`` is not finite or
    ``not_finite`` (a 0-d bool from the other ranks, or ``None``) is set. Returns ``applied``
    (fp32 0-d: 1 if the update was made, else 0). Decided on the device: no host sync.

    C codebooks at once: a leading ``[C]`` on every state tensor (``ema_decay_weight`` and
    ``skipped_batches`` ``[C]``, ``applied [C]``); ``active`` (bool ``[C]``) leaves the
    others as they are (levels dropped by quantize dropout). ``num_codes`` (int32 ``[C]``
    or ``None``): codebook c holds only its first ``num_codes[c]`` codes (padded to K): the
    rest keep their state and the smoothing counts ``num_codes[c]`` codes.

    ``reseed``: ``(x, seed, reseeded, threshold)`` re-seeds dead codes in the same pass
    (one codebook, either backend: see ``vqfast.kernels.ema_update``), else ``None``.
    ``size_rule``: what ``ema_cluster_size`` holds and what the sums are divided by: 0 the
    smoothed sizes (the original's); 1 the decayed sizes, smoothed only to divide
    (encodec's); 2 the decayed sizes, divided by ``max(size, epsilon)`` (moshi's)."""
    x, seed, reseeded, threshold = reseed if reseed is not None else (None, None, None, 0.0)
    return _ema_update_op(counts, code_sums, loss, not_finite, ema_cluster_size, ema_weight,
                          codebook, ema_decay_weight, skipped_batches, decay, epsilon, backend,
                          active, num_codes, x, seed, reseeded, threshold, size_rule)
