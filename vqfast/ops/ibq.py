"""Index backpropagation quantization (IBQ, Shi et al. 2024), streamed over code tiles.

``logits = scale * x @ E^T`` over all K codes, ``p = softmax(logits)``, ``idx = argmax``;
the output ``(onehot(idx) - sg(p) + p) @ E`` has the value ``E[idx]`` and the gradient of
``p @ E``'s softmax path, so every code gets a gradient. The forward keeps a running max,
sum and argmax per row; the backward recomputes each tile of logits: memory
``O(N * D + K * D)``, never ``[N, K]``. Deterministic (fixed tile order, no atomics).

With ``g`` the output's gradient, ``u = p @ E`` and ``v_nk = e_k . g_n``:
``dlogits_nk = p_nk * (v_nk - u_n . g_n)``; ``grad_x = scale * dlogits @ E``;
``grad_E = onehot(idx)^T g + scale * dlogits^T x``.

Two backends behind custom ops: the fused Triton kernels (``vqfast.kernels.ibq``, rows of
``D <= 128``) and the torch path (``vqfast._torch``: tiles of codes x all rows, any D, any
device).
"""

import torch

from .dispatch import _impl, custom_op

IBQ_MAX_KERNEL_DIM = 128


@custom_op("ibq_forward", mutates_args=())
def _ibq_forward_op(x: torch.Tensor, codebook: torch.Tensor, scale: float, argmax_only: bool,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend).ibq_forward(x, codebook, scale, argmax_only)


@_ibq_forward_op.register_fake
def _(x, codebook, scale, argmax_only, backend):
    n = x.shape[0]
    return (x.new_empty(n, dtype=torch.int64), x.new_empty(0 if argmax_only else n),
            x.new_empty((0,) if argmax_only else tuple(x.shape)))


@custom_op("ibq_backward", mutates_args=())
def _ibq_backward_op(grad: torch.Tensor, x: torch.Tensor, codebook: torch.Tensor,
                     idx: torch.Tensor, lse: torch.Tensor, soft: torch.Tensor, scale: float,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(backend).ibq_backward(grad, x, codebook, idx, lse, soft, scale)


@_ibq_backward_op.register_fake
def _(grad, x, codebook, idx, lse, soft, scale, backend):
    return torch.empty_like(x), torch.empty_like(codebook)


class IndexBackprop(torch.autograd.Function):
    """``(out [N, D], idx [N])`` of rows ``x [N, D]`` and ``codebook [K, D]`` (fp32)."""

    @staticmethod
    def forward(ctx, x, codebook, scale, backend):
        x32 = x.detach().float().contiguous()
        book32 = codebook.detach().float().contiguous()
        idx, lse, soft = _ibq_forward_op(x32, book32, scale, False, backend)
        ctx.save_for_backward(x32, book32, idx, lse, soft)
        ctx.scale, ctx.backend = scale, backend
        ctx.mark_non_differentiable(idx)
        return book32[idx].to(x.dtype), idx

    @staticmethod
    def backward(ctx, grad_out, grad_idx):
        x, codebook, idx, lse, soft = ctx.saved_tensors
        grad_x, grad_codebook = _ibq_backward_op(
            grad_out.float().contiguous(), x, codebook, idx, lse, soft, ctx.scale, ctx.backend)
        return grad_x.to(grad_out.dtype), grad_codebook, None, None


def index_backprop(x: torch.Tensor, codebook: torch.Tensor, scale: float = 1.0,
                   backend: str = "torch"):
    """IBQ of rows ``x [N, D]`` with ``codebook [K, D]``: ``(out [N, D], idx int64 [N])``."""
    return IndexBackprop.apply(x, codebook, scale, backend)


def ibq_codes(x: torch.Tensor, codebook: torch.Tensor, scale: float = 1.0,
              backend: str = "torch") -> torch.Tensor:
    """The argmax alone (no exponentials): int64 ``[N]``."""
    return _ibq_forward_op(x.detach().float().contiguous(),
                                        codebook.detach().float().contiguous(), scale, True,
                                        backend)[0]
