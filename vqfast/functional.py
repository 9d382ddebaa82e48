"""Autograd glue and backend dispatch.

The fused ops are registered as ``torch.library`` custom ops (namespace ``vqfast``) so
``torch.compile(fullgraph=True)`` treats them as opaque calls; each op dispatches to the
Triton launchers in ``vqfast.kernels`` or to the torch backend in ``vqfast._torch``.
``_Quantize`` is the ``torch.autograd.Function`` the modules call.
"""

import os

import torch

from . import _torch

BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PRECISIONS = ("ieee", "tf32", "tf32x3")


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend(backend: str) -> None:
    """A constructor's check of its ``backend`` option (resolved per call by ``resolve_backend``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` for CUDA tensors, ``torch`` otherwise; checks ``triton`` is usable."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not _triton_interpreted():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device.type}); on CPU it runs only under "
            "the Triton interpreter (set TRITON_INTERPRET=1 before importing vqfast)")
    return backend


def _impl(backend: str):
    if backend == "triton":
        from . import kernels
        return kernels
    return _torch


def _check_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be fp32, fp16 or bf16 (the kernels' dtypes, on every "
                        f"backend), got {x.dtype}; cast it, e.g. x.float()")


def check_codebook_input(x: torch.Tensor, codebook: torch.Tensor, name: str = "x") -> None:
    """Validate a flat ``[N, D]`` input against a ``[K, D]`` codebook; raise before any work."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    _check_dtype(name, x)
    if x.shape[-1] != codebook.shape[1]:
        raise ValueError(f"{name} has {x.shape[-1]} channels but the codebook has embedding_dim="
                         f"{codebook.shape[1]}")
    if x.device != codebook.device:
        raise ValueError(f"{name} is on {x.device} but the codebook is on {codebook.device}; "
                         "move the module with .to(device)")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); need at least one vector")


def channels_first(name: str, inputs, channels: int) -> torch.Tensor:
    """Validate a quantizer's input ``[B, C, *spatial]`` (a tensor, at least one spatial dim,
    ``channels`` channels, fp32/fp16/bf16, not empty); return it as contiguous ``[B, C, S]``
    (a view when it already is: the kernels read channels-first in place)."""
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.dim() < 3:
        raise ValueError(f"{name} must be channels-first [B, C, *spatial] with at least one "
                         f"spatial dim, got shape {tuple(inputs.shape)}")
    if inputs.shape[1] != channels:
        raise ValueError(f"{name} has {inputs.shape[1]} channels (dim 1), expected {channels}; "
                         f"shape {tuple(inputs.shape)}")
    _check_dtype(name, inputs)
    if inputs.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(inputs.shape)}); need at least one vector")
    return inputs.reshape(inputs.shape[0], channels, -1).contiguous()


# --- custom ops -------------------------------------------------------------------------

@torch.library.custom_op("vqfast::nearest_code", mutates_args=())
def _nearest_code_op(x: torch.Tensor, codebook: torch.Tensor, backend: str,
                     precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(backend).nearest_code(x, codebook, precision)


@_nearest_code_op.register_fake
def _(x, codebook, backend, precision):
    n = _torch.num_vectors(x)
    return x.new_empty(n, dtype=torch.int64), x.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("vqfast::quantize", mutates_args=())
def _quantize_op(x: torch.Tensor, codebook: torch.Tensor, with_code_sums: bool, loss_scale: float,
                 backend: str, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    impl = _impl(backend)
    # With the EMA statistics an update follows that rewrites the codebook: the backward
    # keeps this fp32 copy, taken in the same pass that prepares the codebook. (An output of
    # this op, so compilers cannot move the copy into the backward, past the update.)
    snapshot = (torch.empty(codebook.shape, dtype=torch.float32, device=codebook.device)
                if with_code_sums else codebook.new_empty(0, dtype=torch.float32))
    idx, _ = impl.nearest_code(x, codebook, precision, snapshot if with_code_sums else None)
    q, loss, perplexity, counts, code_sums = impl.gather_loss(x, codebook, idx, with_code_sums,
                                                              loss_scale)
    if code_sums is None:
        code_sums = x.new_empty(0, dtype=torch.float32)
    return q, idx, loss, perplexity, counts, code_sums, snapshot


@_quantize_op.register_fake
def _(x, codebook, with_code_sums, loss_scale, backend, precision):
    n = _torch.num_vectors(x)
    sums_shape = tuple(codebook.shape) if with_code_sums else (0,)
    scalar = x.new_empty((), dtype=torch.float32)
    return (torch.empty_like(x), x.new_empty(n, dtype=torch.int64), scalar, scalar.clone(),
            x.new_empty(codebook.shape[0], dtype=torch.int32),
            x.new_empty(sums_shape, dtype=torch.float32),
            x.new_empty(sums_shape, dtype=torch.float32))


@torch.library.custom_op("vqfast::quantize_backward", mutates_args=())
def _quantize_backward_op(grad_q: torch.Tensor, grad_loss: torch.Tensor, x: torch.Tensor,
                          codebook: torch.Tensor, idx: torch.Tensor, x_scale: float,
                          codebook_scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x, grad_codebook = _impl(backend).quantize_backward(
        grad_q, grad_loss, x, codebook, idx, x_scale, codebook_scale)
    if grad_codebook is None:
        grad_codebook = x.new_empty(0, dtype=torch.float32)
    return grad_x, grad_codebook


@_quantize_backward_op.register_fake
def _(grad_q, grad_loss, x, codebook, idx, x_scale, codebook_scale, backend):
    shape = tuple(codebook.shape) if codebook_scale != 0 else (0,)
    return torch.empty_like(x), x.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("vqfast::ema_update",
                         mutates_args=("ema_cluster_size", "ema_weight", "codebook",
                                       "ema_decay_weight", "skipped_batches"))
def _ema_update_op(counts: torch.Tensor, code_sums: torch.Tensor, loss: torch.Tensor,
                   not_finite: torch.Tensor | None, ema_cluster_size: torch.Tensor,
                   ema_weight: torch.Tensor, codebook: torch.Tensor,
                   ema_decay_weight: torch.Tensor, skipped_batches: torch.Tensor, decay: float,
                   epsilon: float, backend: str, active: torch.Tensor | None = None
                   ) -> torch.Tensor:
    return _impl(backend).ema_update(counts, code_sums, loss, not_finite, ema_cluster_size,
                                     ema_weight, codebook, ema_decay_weight, skipped_batches,
                                     decay, epsilon, active)


@_ema_update_op.register_fake
def _(counts, code_sums, loss, not_finite, ema_cluster_size, ema_weight, codebook,
      ema_decay_weight, skipped_batches, decay, epsilon, backend, active=None):
    return loss.new_empty(ema_decay_weight.shape, dtype=torch.float32)


# --- autograd ---------------------------------------------------------------------------

class _Quantize(torch.autograd.Function):
    """``x: [N, D]`` or channels-first ``[B, D, S]`` (N = B * S), ``codebook: [K, D]`` ->
    ``q`` (x's layout), ``loss``, ``idx [N]``, ``perplexity``, ``counts [K]``,
    ``code_sums`` (fp32 ``[K, D]`` per-code sums of x for the EMA update when
    ``with_code_sums``, else an empty tensor).

    ``loss = (codebook_loss + commitment_cost) * mse(q, x)``: the seed's
    ``q_latent_loss + commitment_cost * e_latent_loss`` for ``VectorQuantizer``
    (``codebook_loss=True``), ``commitment_cost * e_latent_loss`` for the EMA quantizer.
    The output's value is ``q``; its gradient flows straight through to ``x``.

    The backward gathers ``q`` again from the codebook in fp32 (saved: ``[K, D]``, not
    ``[N, D]``; a copy when ``with_code_sums``, since the EMA update then rewrites it).
    The codebook gets a gradient only when the loss is differentiated (else ``None``).
    """

    @staticmethod
    def forward(ctx, x, codebook, commitment_cost, codebook_loss, with_code_sums, backend,
                precision):
        numel = x.numel()
        loss_scale = (float(codebook_loss) + commitment_cost) / numel
        q, idx, loss, perplexity, counts, code_sums, snapshot = torch.ops.vqfast.quantize(
            x, codebook.detach(), with_code_sums, loss_scale, backend, precision)
        ctx.save_for_backward(x, snapshot if with_code_sums else codebook.detach(), idx)
        ctx.x_scale = 2.0 * commitment_cost / numel
        ctx.codebook_scale = 2.0 / numel if codebook_loss else 0.0
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
        grad_x, grad_codebook = torch.ops.vqfast.quantize_backward(
            grad_q.contiguous(), grad_loss.float(), x, codebook, idx, ctx.x_scale,
            codebook_scale, ctx.backend)
        if codebook_scale == 0:
            grad_codebook = None
        return grad_x, grad_codebook, None, None, None, None, None


def quantize(x, codebook, commitment_cost, codebook_loss, with_code_sums=False, backend="torch",
             precision="ieee"):
    """Differentiable nearest-code quantization of a contiguous ``x: [N, D]`` or ``[B, D, S]``.

    Returns ``(q, loss, idx, perplexity, counts, code_sums)``; see ``_Quantize``.
    """
    return _Quantize.apply(x, codebook, commitment_cost, codebook_loss, with_code_sums, backend,
                           precision)


def ema_update(counts, code_sums, loss, not_finite, ema_cluster_size, ema_weight, codebook,
               ema_decay_weight, skipped_batches, decay, epsilon, backend, active=None):
    """In-place EMA codebook update from this batch's ``counts [K]`` and ``code_sums [K, D]``,
    skipped (and counted in ``skipped_batches``) when ``loss`` is not finite or
    ``not_finite`` (a 0-d bool from the other ranks, or ``None``) is set. Returns ``applied``
    (fp32 0-d: 1 if the update was made, else 0). Decided on the device: no host sync.

    C codebooks at once: a leading ``[C]`` on every state tensor (``ema_decay_weight`` and
    ``skipped_batches`` ``[C]``, ``applied [C]``); ``active`` (bool ``[C]``) leaves the
    others as they are (levels dropped by quantize dropout)."""
    return torch.ops.vqfast.ema_update(counts, code_sums, loss, not_finite, ema_cluster_size,
                                       ema_weight, codebook, ema_decay_weight, skipped_batches,
                                       decay, epsilon, backend, active)


perplexity = _torch.perplexity


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, backend: str = "auto",
                 precision: str = "ieee"):
    """Nearest code of every row: ``x: [N, D]``, ``codebook: [K, D]`` -> ``int64 [N]``, ``fp32 [N]``.

    The distance returned is ``|x - e|^2`` from the expanded form ``|x|^2 + |e|^2 - 2 x.e``
    in fp32 (clamped at 0). ``precision`` picks the Triton dot precision for fp32 inputs:
    ``"ieee"`` (default: argmins agree with fp32 matmul up to rounding ties), ``"tf32x3"``
    (near-fp32, on tensor cores) or ``"tf32"`` (fastest; may flip near-ties). No ``[N, K]``
    tensor is allocated on either backend.
    """
    if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2:
        raise ValueError("codebook must be a [K, D] tensor")
    check_codebook_input(x, codebook)
    if x.dim() != 2:
        raise ValueError(f"x must be [N, D], got shape {tuple(x.shape)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    backend = resolve_backend(backend, x.device)
    return torch.ops.vqfast.nearest_code(x.contiguous(), codebook.detach().contiguous(), backend,
                                         precision)
