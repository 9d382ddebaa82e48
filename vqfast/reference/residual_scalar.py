"""Residual FSQ and LFQ, level by level from the papers' quantizers."""

import torch

from .lookup_free import fsq, lfq_code_matrix


def residual_fsq_scales(levels, num_levels: int) -> torch.Tensor:
    """Level ``l``'s input scale per channel, ``(2 * (L // 2)) ** -l`` (fp32 ``[Q, C]``): one
    step of a level's grid, ``1 / (L // 2)``, is 2 of the next level's range ``[-1, 1]``
    times its scale, so the next level spans the residual's ``[-step/2, step/2]``."""
    levels = torch.as_tensor(levels, dtype=torch.float64)
    span = 2 * torch.div(levels, 2, rounding_mode="floor")
    return (span[None, :] ** -torch.arange(num_levels, dtype=torch.float64)[:, None]).float()


def residual_fsq(z: torch.Tensor, levels, num_levels: int, groups: int = 1, active_levels=None):
    """Residual FSQ of channels-last ``z: [N, G*C]``, ``C = len(levels)``, by plain autograd:
    group ``g`` (channels ``g*C .. (g+1)*C``) runs ``num_levels`` FSQ levels; level ``l``
    quantizes the residual ``r_l = z_g - sg(q_0 + ... + q_{l-1})`` as ``q_l = s_l *
    fsq(r_l / s_l)`` with ``s_l = residual_fsq_scales(levels, Q)[l]``, each with FSQ's
    straight-through gradient of the bound. Only the first ``active_levels`` run (the rest
    get code -1). Returns ``(quantized [N, G*C] fp32, codes int64 [G*Q, N])``."""
    c = len(levels)
    active = num_levels if active_levels is None else int(active_levels)
    scales = residual_fsq_scales(levels, num_levels).to(z.device)
    codes = torch.full((groups * num_levels, z.shape[0]), -1, dtype=torch.int64, device=z.device)
    outs = []
    for g in range(groups):
        r, total = z[:, g * c:(g + 1) * c].float(), 0.0
        for level in range(active):
            q, codes[g * num_levels + level] = fsq(r / scales[level], levels)
            q = q * scales[level]
            total = total + q
            r = r - q.detach()
        outs.append(total)
    return torch.cat(outs, 1), codes


def residual_lfq(z: torch.Tensor, num_levels: int, groups: int = 1, entropy_loss_weight=0.1,
                 commitment_cost=0.25, diversity_gamma=1.0, inv_temperature=100.0,
                 active_levels=None):
    """Residual LFQ of channels-last ``z: [N, G*d]`` by brute force over all ``2**d`` codes
    per level (small d only). Level ``l`` of group ``g`` quantizes ``r_l = z_g - sg(q_0 +
    ... + q_{l-1})`` to ``q_l = sign(r_l) * 2**-l`` (codes ``{-1, 1}^d * 2**-l``, the first
    channel most significant); its entropy terms are LFQ's with ``p(c|r) = softmax_c(2 *
    inv_temperature * <r, c>)`` over the scaled codes.

    ``loss = sum_l [mean_g entropy_loss_weight * (H_sample - diversity_gamma * H_codebook)
    + commitment_cost * sum_g |r_l - q_l|^2 / (N * G*d)]`` over the first ``active_levels``
    levels. ``quantized`` is the sum of the levels with the identity's gradient
    (straight-through on the sum). Returns ``(loss, quantized [N, G*d] fp32, codes int64
    [G*Q, N], per_sample_entropy [G*Q], codebook_entropy [G*Q])`` (0 for dropped levels).
    """
    x = z if z.dtype == torch.float64 else z.float()
    n, dim = x.shape
    d = dim // groups
    active = num_levels if active_levels is None else int(active_levels)
    codebook = lfq_code_matrix(d, x.device).to(x.dtype)
    bits = 2 ** torch.arange(d - 1, -1, -1, device=x.device)
    codes = torch.full((groups * num_levels, n), -1, dtype=torch.int64, device=x.device)
    sample_h = x.new_zeros(groups * num_levels)
    book_h = x.new_zeros(groups * num_levels)
    loss, outs = x.new_zeros(()), []
    for g in range(groups):
        r, total = x[:, g * d:(g + 1) * d], 0.0
        for level in range(active):
            slot, scale = g * num_levels + level, 2.0 ** -level
            logits = 2 * inv_temperature * r @ (codebook * scale).t()
            prob = torch.softmax(logits, dim=1)
            h_sample = -(prob * torch.log_softmax(logits, dim=1)).sum(1).mean()
            avg = prob.mean(0)
            h_book = -(avg * torch.log(avg.clamp_min(torch.finfo(x.dtype).tiny))).sum()
            q = torch.where(r > 0, scale, -scale).to(x.dtype)
            loss = (loss + entropy_loss_weight * (h_sample - diversity_gamma * h_book) / groups
                    + commitment_cost * ((r - q) ** 2).sum() / (n * dim))
            sample_h[slot], book_h[slot] = h_sample.detach(), h_book.detach()
            codes[slot] = ((r > 0).long() * bits).sum(1)
            total = total + q
            r = r - q
        outs.append(total)
    quantized = x + (torch.cat(outs, 1) - x).detach()
    return loss, quantized, codes, sample_h, book_h
