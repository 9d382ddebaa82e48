"""Index backpropagation quantization (IBQ, Shi et al. 2024), streamed over code tiles.

``logits = scale * x @ E^T`` over all K codes, ``p = softmax(logits)``, ``idx = argmax``;
the output ``(onehot(idx) - sg(p) + p) @ E`` has the value ``E[idx]`` and the gradient of
``p @ E``'s softmax path, so every code gets a gradient. The forward keeps a running max,
sum and argmax per row; the backward recomputes each tile of logits: memory
``O(N * D + K * D)``, never ``[N, K]``. Deterministic (fixed tile order, no atomics).

With ``g`` the output's gradient, ``u = p @ E`` and ``v_nk = e_k . g_n``:
``dlogits_nk = p_nk * (v_nk - u_n . g_n)``; ``grad_x = scale * dlogits @ E``;
``grad_E = onehot(idx)^T g + scale * dlogits^T x``.

The torch path below runs on every device; a fused Triton kernel is not written yet.
"""

import torch

_TILE_ELEMENTS = 1 << 22  # logits per tile: rows x codes


def _code_tiles(k: int, n: int):
    codes = max(1, min(k, _TILE_ELEMENTS // max(n, 1)))
    for c0 in range(0, k, codes):
        yield c0, min(k, c0 + codes)


@torch.no_grad()
def ibq_forward(x: torch.Tensor, codebook: torch.Tensor, scale: float, argmax_only=False):
    """``x fp32 [N, D]``, ``codebook fp32 [K, D]`` -> ``idx int64 [N]`` (argmax of the
    logits), ``lse fp32 [N]`` (their log-sum-exp) and ``soft fp32 [N, D]`` (``p @ E``);
    with ``argmax_only`` (encoding) ``idx`` alone, no exponentials."""
    n = x.shape[0]
    best = torch.full((n,), -float("inf"), device=x.device)  # the running max of the logits
    idx = torch.zeros(n, dtype=torch.int64, device=x.device)
    running_sum = torch.zeros(n, device=x.device)  # sum of exp(logit - best)
    soft = torch.zeros_like(x)  # sum of exp(logit - best) * code
    for c0, c1 in _code_tiles(codebook.shape[0], n):
        logits = (x @ codebook[c0:c1].t()).mul_(scale)  # [N, tile]
        value, where = logits.max(1)
        better = value > best  # strictly: the first maximum wins, as argmax
        idx = torch.where(better, where + c0, idx)
        new_best = torch.where(better, value, best)
        if not argmax_only:
            rescale = torch.exp(best - new_best)
            weights = torch.exp(logits - new_best[:, None])
            running_sum = running_sum * rescale + weights.sum(1)
            soft = soft * rescale[:, None] + weights @ codebook[c0:c1]
        best = new_best
    if argmax_only:
        return idx
    return idx, best + torch.log(running_sum), soft / running_sum[:, None]


@torch.no_grad()
def ibq_backward(grad: torch.Tensor, x: torch.Tensor, codebook: torch.Tensor, idx, lse, soft,
                 scale: float):
    """``(grad_x fp32 [N, D], grad_codebook fp32 [K, D])`` of the output for its gradient
    ``grad [N, D]``, the logits recomputed tile by tile."""
    n = x.shape[0]
    centre = (soft * grad).sum(1)  # u_n . g_n
    grad_x = torch.zeros_like(x)
    grad_codebook = torch.zeros_like(codebook).index_add_(0, idx, grad)  # onehot^T g
    for c0, c1 in _code_tiles(codebook.shape[0], n):
        book = codebook[c0:c1]
        p = (x @ book.t()).mul_(scale).sub_(lse[:, None]).exp_()  # [N, tile]
        dlogits = p.mul_((grad @ book.t()).sub_(centre[:, None])).mul_(scale)
        grad_x.addmm_(dlogits, book)
        grad_codebook[c0:c1] += dlogits.t() @ x
    return grad_x, grad_codebook


class IndexBackprop(torch.autograd.Function):
    """``(out [N, D], idx [N])`` of rows ``x [N, D]`` and ``codebook [K, D]`` (fp32)."""

    @staticmethod
    def forward(ctx, x, codebook, scale):
        x32, book32 = x.detach().float(), codebook.detach().float()
        idx, lse, soft = ibq_forward(x32, book32, scale)
        ctx.save_for_backward(x32, book32, idx, lse, soft)
        ctx.scale = scale
        ctx.mark_non_differentiable(idx)
        return book32[idx].to(x.dtype), idx

    @staticmethod
    def backward(ctx, grad_out, grad_idx):
        x, codebook, idx, lse, soft = ctx.saved_tensors
        grad_x, grad_codebook = ibq_backward(grad_out.float(), x, codebook, idx, lse, soft,
                                             ctx.scale)
        return grad_x.to(grad_out.dtype), grad_codebook, None


def index_backprop(x: torch.Tensor, codebook: torch.Tensor, scale: float = 1.0):
    """IBQ of rows ``x [N, D]`` with ``codebook [K, D]``: ``(out [N, D], idx int64 [N])``."""
    return IndexBackprop.apply(x, codebook, scale)
