"""Residual, grouped and cosine VQ (SoundStream, EnCodec, DAC, ViT-VQGAN), written plainly."""

import torch
import torch.nn.functional as F

from .vq import nearest_code


# --- residual, grouped and cosine VQ (SoundStream, EnCodec, DAC, ViT-VQGAN) -------------
# Plain [N, K] distances and autograd: the gradients of the fast paths are checked
# against torch's differentiation of these formulas, not against a hand-derived rule.

# Rows whose input is this much shorter than their code (|e| < ratio * |q|, zero inputs
# included) take the straight-through gradient instead of the rotation's: its scale
# lambda = |q| / |e| would blow up (|q| * 1e12 for a zero row in fp32, inf in fp16).
ROTATION_MIN_NORM_RATIO = 1e-3


def rotate_to(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The rotation trick (Fifty et al., 2024), rows of ``e, q: [N, d]``: returns
    ``sg(lambda R) e`` with ``lambda = |q| / |e|`` and ``R`` the rotation taking ``e/|e|``
    to ``q/|q|`` (``R = I - 2 r r^T + 2 q^ e^T``, ``r = (e^ + q^) / |e^ + q^|``), built as
    explicit ``[N, d, d]`` matrices. Its value is ``q``; ``e`` receives ``lambda R^T g``,
    or ``g`` straight through where ``|e| < ROTATION_MIN_NORM_RATIO * |q|``."""
    straight = e + (q - e).detach()
    with torch.no_grad():
        degenerate = e.norm(dim=1, keepdim=True) < ROTATION_MIN_NORM_RATIO * q.norm(dim=1, keepdim=True)
        e_norm = e.norm(dim=1, keepdim=True).clamp_min(1e-12)
        q_norm = q.norm(dim=1, keepdim=True)
        e_hat, q_hat = e / e_norm, q / q_norm.clamp_min(1e-12)
        r = e_hat + q_hat
        r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
        eye = torch.eye(e.shape[1], dtype=e.dtype, device=e.device)
        rotation = (eye - 2 * r[:, :, None] * r[:, None, :]
                    + 2 * q_hat[:, :, None] * e_hat[:, None, :])
        scale = q_norm / e_norm
    return torch.where(degenerate, straight, scale * torch.einsum("nij,nj->ni", rotation, e))


def residual_vq(x, codebooks, num_levels, *, groups=1, cosine=False, commitment_cost=0.25,
                ema=True, active_levels=None, mask=None, rotation_trick=False):
    """Residual (and grouped) VQ of ``x: [N, D]`` by brute force.

    ``codebooks: [G * C, K, D / G]`` with ``C = num_levels`` (one codebook per level) or
    ``C = 1`` (shared by the levels of a group); or a list of ``G * C`` codebooks ``[K_c,
    D / G]`` of their own sizes (statistics are then padded to the largest K). Group ``g`` owns channels
    ``g * D/G .. (g+1) * D/G``. Level ``l`` quantizes the residual
    ``r_l = x_g - sg(q_0 + ... + q_{l-1})`` (l2-normalised to ``r~_l`` when ``cosine``;
    the codes are taken as they come) by the nearest code of ``r~_l``; with
    ``cosine="search"`` (DAC, SNAC) the code whose direction is nearest that of ``r_l``
    (residual and codebook l2-normalised for the search only), ``r~_l = r_l``. Only the first
    ``active_levels`` levels run; rows where ``mask`` (bool ``[N]``) is False are not
    quantized (their output is ``x``).

    ``loss = sum_{g,l} sum_valid |q_l - r~_l|^2 / (n_valid * D)`` weighted
    ``commitment_cost`` (EMA), or ``(1 + commitment_cost)`` split as codebook loss on
    ``q`` and commitment on ``r~`` (``ema=False``). The output's value is the sum of the
    codes, its gradient the identity (straight-through on the sum) or, with
    ``rotation_trick``, the rotation of ``x_g`` onto that sum.

    Returns ``(out [N, D], loss, idx int64 [G*Q, N] (-1: masked or inactive),
    sq_err [G*Q], counts [G*Q, K], code_sums [G*Q, K, D/G])`` (statistics detached).
    """
    n, dim = x.shape
    books, d = len(codebooks), codebooks[0].shape[1]
    k = max(book.shape[0] for book in codebooks)
    shared = books == groups and num_levels > 1
    active = num_levels if active_levels is None else int(active_levels)
    valid = torch.ones(n, dtype=torch.bool, device=x.device) if mask is None else mask
    weight = valid.to(x.dtype)[:, None]
    idx = torch.full((groups * num_levels, n), -1, dtype=torch.int64, device=x.device)
    sq_err = x.new_zeros(groups * num_levels)
    counts = torch.zeros(groups * num_levels, k, dtype=torch.int64, device=x.device)
    code_sums = x.new_zeros(groups * num_levels, k, d)
    outs, loss = [], x.new_zeros(())
    for g in range(groups):
        x_g = x[:, g * d:(g + 1) * d]
        total = torch.zeros_like(x_g)
        for level in range(active):
            book = codebooks[g if shared else g * num_levels + level]
            r = x_g - total.detach()
            if cosine == "search":
                r_used = r
                i = nearest_code(F.normalize(r, dim=1).detach(), F.normalize(book, dim=1).detach())
            else:
                r_used = F.normalize(r, dim=1) if cosine else r
                i = nearest_code(r_used.detach(), book.detach())
            q = book[i]
            err = ((q - r_used) ** 2 * weight).sum() / (valid.sum() * dim)
            if ema:
                loss = loss + commitment_cost * ((q.detach() - r_used) ** 2 * weight).sum() / (valid.sum() * dim)
            else:
                loss = (loss + ((q - r_used.detach()) ** 2 * weight).sum() / (valid.sum() * dim)
                        + commitment_cost * ((q.detach() - r_used) ** 2 * weight).sum() / (valid.sum() * dim))
            slot = g * num_levels + level
            idx[slot] = torch.where(valid, i, -1)
            sq_err[slot] = err.detach() * valid.sum() * dim
            onehot = F.one_hot(i, k).to(x.dtype) * weight  # (padded to the largest K)
            counts[slot] = onehot.sum(0).long()
            code_sums[slot] = onehot.t() @ r_used.detach()
            total = total + q
        out_g = rotate_to(x_g, total) if rotation_trick else x_g + (total - x_g).detach()
        outs.append(torch.where(valid[:, None], out_g, x_g))
    return torch.cat(outs, 1), loss, idx, sq_err, counts, code_sums
