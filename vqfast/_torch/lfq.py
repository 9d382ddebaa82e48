"""LFQ's codebook entropy: the average code probability and its backward, in code chunks."""

import torch

from . import _common  # (_common._CHUNK_ELEMENTS: read at each call)


# --- LFQ codebook entropy ---------------------------------------------------------------

def _lfq_codes(start: int, stop: int, dim: int, device) -> torch.Tensor:
    """Codes ``start..stop-1`` as ``[stop - start, dim]`` rows of ±1 (first channel most significant)."""
    bits = torch.arange(dim - 1, -1, -1, device=device)
    return ((torch.arange(start, stop, device=device)[:, None] >> bits) & 1).float() * 2 - 1


# A vector's code distribution factorises over channels, so over the two halves of the
# bits: p_n(c) = P_n(a) Q_n(b) for c = (a, b), a the first h = d // 2 channels. The mean
# over vectors is then one GEMM, avg[a, b] = sum_n P_n(a) Q_n(b) / N, and its gradient two
# more: work O(N 2**(d/2) d + N 2**d), memory O(rows 2**(d/2) + 2**d), exact (no
# approximation: the same sums, grouped). The Triton path streams all 2**d codes instead.

def _lfq_halves(d: int):
    h = d // 2
    return ((0, h), (h, d))


def _lfq_half_probs(logit: torch.Tensor) -> tuple:
    """``logit: fp32 [rows, w]`` (``2 * inv_temperature * x`` on w channels) -> the code
    distribution of those channels ``[rows, 2**w]`` (first channel most significant) and
    the codes ``[2**w, w]`` (±1)."""
    w = logit.shape[1]
    codes = _lfq_codes(0, 2**w, w, logit.device)
    lse = torch.logaddexp(logit, -logit).sum(1, keepdim=True)
    return (logit @ codes.t() - lse).exp_(), codes


def _lfq_row_chunks(n: int, d: int):
    rows = max(1, _common._CHUNK_ELEMENTS // 2 ** (d - d // 2))
    for r0 in range(0, n, rows):
        yield slice(r0, min(n, r0 + rows))


def lfq_avg_prob(x, lse, inv_temperature, precision="ieee"):
    """``x: [N, d]`` -> ``avg: fp32 [2**d]``, ``mean_n p(c|x_n)``, as ``P^T Q / N`` over row
    chunks (never ``[N, 2**d]``); a batch ``[slots, N, d]`` -> ``[slots, 2**d]``. ``lse``
    (the Triton path's operand) is implied here."""
    if x.dim() == 3:
        return torch.stack([lfq_avg_prob(x[i], None, inv_temperature) for i in range(x.shape[0])])
    del precision, lse
    n, d = x.shape
    scaled = x.float() * (2.0 * inv_temperature)
    (a0, a1), (b0, b1) = _lfq_halves(d)
    avg = torch.zeros(2 ** (a1 - a0), 2 ** (b1 - b0), dtype=torch.float32, device=x.device)
    for rows in _lfq_row_chunks(n, d):
        p, _ = _lfq_half_probs(scaled[rows, a0:a1])
        q, _ = _lfq_half_probs(scaled[rows, b0:b1])
        avg.addmm_(p.t(), q)
    return avg.view(-1) / n


def lfq_entropy_backward(x, lse, g, coef, inv_temperature, precision="ieee"):
    """``grad_x: fp32 [N, d]`` of ``coef * sum_c g[c] avg[c]``: per half, ``coef * scale *
    (sum_a R_n(a) a - tanh(l_n) sum_a R_n(a))`` with ``R_n(a) = P_n(a) sum_b g[a, b]
    Q_n(b)`` (and the same for the other half). Batched as ``lfq_avg_prob``."""
    if x.dim() == 3:
        return torch.stack([lfq_entropy_backward(x[i], None, g[i], coef, inv_temperature)
                            for i in range(x.shape[0])])
    del precision, lse
    n, d = x.shape
    scale = 2.0 * inv_temperature
    scaled = x.float() * scale
    (a0, a1), (b0, b1) = _lfq_halves(d)
    g = g.float().view(2 ** (a1 - a0), 2 ** (b1 - b0))
    grad = torch.empty(n, d, dtype=torch.float32, device=x.device)
    for rows in _lfq_row_chunks(n, d):
        p, codes_a = _lfq_half_probs(scaled[rows, a0:a1])
        q, codes_b = _lfq_half_probs(scaled[rows, b0:b1])
        for lo, hi, own, other, codes, weights in ((a0, a1, p, q, codes_a, g.t()),
                                                    (b0, b1, q, p, codes_b, g)):
            r = own * (other @ weights)  # [rows, 2**w]
            grad[rows, lo:hi] = r @ codes - torch.tanh(scaled[rows, lo:hi]) * r.sum(1, keepdim=True)
    return grad * (coef * scale)


# --- LFQ quantization and its per-vector terms ---------------------------------------------

def _lfq_signs(x: torch.Tensor, scale: float):
    """``(x > 0, +scale / -scale in x's dtype)`` of ``x [B, d, S]``."""
    positive = x > 0
    return positive, torch.where(positive, scale, -scale).to(x.dtype)


def _binary_entropy(t: torch.Tensor) -> torch.Tensor:
    softplus = torch.nn.functional.softplus
    return torch.sigmoid(t) * softplus(-t) + torch.sigmoid(-t) * softplus(t)


def _terms(xf, sign, t, weight, n, d, commitment_cost, entropy_weight):
    """LFQ's commitment and per-sample entropy of slots ``[slots, ...]``: fp32 ``xf``, its
    codes ``sign`` and entropy logits ``t``, each slot's sums times ``weight [slots]``."""
    dims = tuple(range(1, xf.dim()))
    commitment = (commitment_cost / (n * d)) * ((xf - sign).pow(2).sum(dims) * weight).sum()
    entropy = ((entropy_weight / n) * (_binary_entropy(t).sum(dims) * weight).sum()
               if entropy_weight else xf.new_zeros(()))
    return commitment, entropy


def _terms_grad(grad, grad_commitment, grad_entropy, xf, sign, t, t_scale, weight, n, d,
                commitment_cost, entropy_weight):
    """``grad`` plus the gradient of ``_terms`` (``weight``, ``t_scale``: broadcast to
    ``xf``); a term without weight adds nothing (not ``0 * inf``)."""
    if commitment_cost:
        grad = grad + (grad_commitment * (2.0 * commitment_cost / (n * d))) * weight * (xf - sign)
    if entropy_weight:
        grad = grad - (grad_entropy * (entropy_weight / n)) * weight * t_scale * (
            t * torch.sigmoid(t) * torch.sigmoid(-t))
    return grad


def lfq_quantize(x, scale, commitment_cost, entropy_weight, inv_temperature):
    """See ``vqfast.kernels.lfq_quantize``: ``(q, commitment, entropy, codes, counts)``."""
    x3 = _common._as_bds(x)
    n, d = _common.num_vectors(x), x3.shape[1]
    positive, sign = _lfq_signs(x3, scale)
    bits = 2 ** torch.arange(d - 1, -1, -1, device=x.device).view(1, d, 1)
    codes = (positive.long() * bits).sum(1).view(-1)
    counts = torch.zeros(2**d, dtype=torch.int32, device=x.device).scatter_add_(
        0, codes, torch.ones_like(codes, dtype=torch.int32))
    xf = x3.float()[None]
    commitment, entropy = _terms(xf, sign.float()[None], xf * (4.0 * inv_temperature * scale),
                                 xf.new_ones(1), n, d, commitment_cost, entropy_weight)
    return sign.view(x.shape), commitment, entropy, codes, counts


def lfq_quantize_backward(grad_q, grad_commitment, grad_entropy, x, scale, commitment_cost,
                          entropy_weight, inv_temperature):
    """See ``vqfast.kernels.lfq_quantize_backward``."""
    x3 = _common._as_bds(x)
    xf, t_scale = x3.float(), 4.0 * inv_temperature * scale
    grad = _terms_grad(torch.zeros_like(xf) if grad_q is None else grad_q.float().view(x3.shape),
                       grad_commitment, grad_entropy, xf,
                       _lfq_signs(x3, scale)[1].float(), xf * t_scale, t_scale, 1.0,
                       _common.num_vectors(x), x3.shape[1], commitment_cost, entropy_weight)
    return grad.to(x.dtype).view(x.shape)


def _slot_signs(x, scale):
    return torch.where(x > 0, scale, -scale).to(x.dtype).float()


def lfq_terms(x, slot_scale, slot_weight, commitment_cost, entropy_weight, inv_temperature):
    """See ``vqfast.kernels.lfq_terms``: ``(commitment, entropy)`` of slots ``[slots, N, d]``."""
    scale, xf = slot_scale[:, None, None], x.float()
    return _terms(xf, _slot_signs(x, scale), xf * (4.0 * inv_temperature) * scale, slot_weight,
                  x.shape[1], x.shape[2], commitment_cost, entropy_weight)


def lfq_terms_backward(grad_commitment, grad_entropy, x, slot_scale, slot_weight,
                       commitment_cost, entropy_weight, inv_temperature):
    """See ``vqfast.kernels.lfq_terms_backward``."""
    scale, weight = slot_scale[:, None, None], slot_weight[:, None, None]
    xf, t_scale = x.float(), 4.0 * inv_temperature * scale
    grad = _terms_grad(torch.zeros_like(xf), grad_commitment, grad_entropy, xf,
                       _slot_signs(x, scale), xf * t_scale, t_scale, weight, x.shape[1],
                       x.shape[2], commitment_cost, entropy_weight)
    return grad.to(x.dtype)
