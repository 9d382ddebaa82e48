"""Lookup-free quantizers: FSQ (Mentzer et al., 2023), LFQ (Yu et al., 2023) and BSQ
(Zhao et al., 2024), written plainly from the papers."""

import torch
import torch.nn.functional as F


def fsq_bound(z: torch.Tensor, levels: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """FSQ's bounding, ``z: [..., C]``: ``tanh(z + shift) * half_l - offset``, so that rounding
    gives ``levels[i]`` integer values per channel (shifted by half a step for even levels)."""
    levels = levels.to(z.device, torch.float32)
    half_l = (levels - 1) * (1 + eps) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    shift = torch.atanh(offset / half_l)
    return torch.tanh(z.float() + shift) * half_l - offset


def fsq(z: torch.Tensor, levels) -> tuple:
    """Finite scalar quantization of channels-last ``z: [..., C]``, ``C = len(levels)``.

    Returns ``quantized`` (fp32, on the grid ``(k - L//2) / (L//2)``, straight-through
    gradient of the bounded ``z``) and ``codes`` (int64 ``[...]``, mixed radix, the first
    channel least significant).
    """
    levels = torch.as_tensor(levels, dtype=torch.int64, device=z.device)
    bounded = fsq_bound(z, levels)
    rounded = bounded + (torch.round(bounded) - bounded).detach()
    half_width = (levels // 2).float()
    quantized = rounded / half_width
    digits = (torch.round(bounded) + half_width).long()
    basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0)
    return quantized, (digits * basis).sum(-1)


def lfq_code_matrix(dim: int, device=None) -> torch.Tensor:
    """All ``2**dim`` LFQ codes as rows of ±1, ``[2**dim, dim]``: row ``c`` has +1 in
    channel ``i`` where bit ``dim - 1 - i`` of ``c`` is set (the first channel most significant)."""
    bits = torch.arange(dim - 1, -1, -1, device=device)
    return ((torch.arange(2**dim, device=device)[:, None] >> bits) & 1).float() * 2 - 1


def lfq(z: torch.Tensor, entropy_loss_weight=0.1, commitment_cost=0.25, diversity_gamma=1.0,
        inv_temperature=100.0):
    """Lookup-free quantization of channels-last ``z: [N, d]`` by brute force over all
    ``2**d`` codes (small d only: it builds ``[N, 2**d]``).

    ``p(c|x) = softmax_c(2 * inv_temperature * <x, c>)``;
    ``loss = entropy_loss_weight * (mean_x H(p(.|x)) - diversity_gamma * H(mean_x p(.|x)))
    + commitment_cost * mse(z, sign(z))``. Returns ``(loss, quantized, codes,
    per_sample_entropy, codebook_entropy)``; ``quantized = sign(z)`` (+1 where ``z > 0``)
    with a straight-through gradient.
    """
    x = z if z.dtype == torch.float64 else z.float()  # float64 in: an exact reference
    codebook = lfq_code_matrix(x.shape[1], x.device).to(x.dtype)
    logits = 2 * inv_temperature * x @ codebook.t()
    prob = torch.softmax(logits, dim=1)
    per_sample_entropy = -(prob * torch.log_softmax(logits, dim=1)).sum(1).mean()
    avg = prob.mean(0)
    # (0 log 0 = 0, with a finite gradient where a code's mean probability underflows)
    codebook_entropy = -(avg * torch.log(avg.clamp_min(torch.finfo(x.dtype).tiny))).sum()
    sign = torch.where(x > 0, 1.0, -1.0).to(x.dtype)
    commitment = F.mse_loss(x, sign)
    loss = (entropy_loss_weight * (per_sample_entropy - diversity_gamma * codebook_entropy)
            + commitment_cost * commitment)
    quantized = x + (sign - x).detach()
    bits = 2 ** torch.arange(x.shape[1] - 1, -1, -1, device=x.device)
    codes = ((x > 0).long() * bits).sum(1)
    return loss, quantized, codes, per_sample_entropy, codebook_entropy


def bsq(z: torch.Tensor, entropy_loss_weight=0.1, commitment_cost=0.25, diversity_gamma=1.0,
        inv_temperature=100.0):
    """Binary spherical quantization (Zhao et al. 2024) of channels-last ``z: [N, d]`` by
    brute force over all ``2**d`` codes ``{-1, 1}^d / sqrt(d)`` (small d only).

    ``u = z / |z|``, ``q = sign(u) / sqrt(d)`` with a straight-through gradient on ``u``;
    ``p(c|u) = softmax_c(2 * inv_temperature * <u, c>)``; ``loss = entropy_loss_weight *
    (mean_u H(p(.|u)) - diversity_gamma * H(mean_u p(.|u))) + commitment_cost * mse(u, q)``.
    Returns ``(loss, quantized, codes, per_sample_entropy, codebook_entropy)``.
    """
    x = z if z.dtype == torch.float64 else z.float()
    d = x.shape[1]
    u = F.normalize(x, dim=1)
    codebook = lfq_code_matrix(d, x.device).to(x.dtype) / d**0.5
    logits = 2 * inv_temperature * u @ codebook.t()
    prob = torch.softmax(logits, dim=1)
    per_sample_entropy = -(prob * torch.log_softmax(logits, dim=1)).sum(1).mean()
    avg = prob.mean(0)
    codebook_entropy = -(avg * torch.log(avg.clamp_min(torch.finfo(x.dtype).tiny))).sum()
    q = torch.where(u > 0, 1.0, -1.0).to(x.dtype) / d**0.5
    loss = (entropy_loss_weight * (per_sample_entropy - diversity_gamma * codebook_entropy)
            + commitment_cost * F.mse_loss(u, q))
    bits = 2 ** torch.arange(d - 1, -1, -1, device=x.device)
    codes = ((u > 0).long() * bits).sum(1)
    return loss, u + (q - u).detach(), codes, per_sample_entropy, codebook_entropy


def bsq_grouped_codebook_entropy(z: torch.Tensor, groups: int, inv_temperature=100.0):
    """The BSQ paper's approximation of the codebook entropy: the d bits split into
    ``groups`` equal groups, ``sum_g H(mean_u p_g(.|u))`` over each group's marginal code
    distribution (an upper bound of the exact ``H(mean_u p(.|u))``: entropy is subadditive;
    equal to it with one group)."""
    x = z if z.dtype == torch.float64 else z.float()
    d = x.shape[1]
    if d % groups:
        raise ValueError(f"d={d} is not divisible by groups={groups}")
    u = F.normalize(x, dim=1)
    w = d // groups
    codebook = lfq_code_matrix(w, x.device).to(x.dtype) / d**0.5
    total = x.new_zeros(())
    for g in range(groups):
        avg = torch.softmax(2 * inv_temperature * u[:, g * w:(g + 1) * w] @ codebook.t(), 1).mean(0)
        total = total - (avg * torch.log(avg.clamp_min(torch.finfo(x.dtype).tiny))).sum()
    return total
