"""The original notebook's quantizers, written plainly: the reference implementation every
test compares against and the benchmark baseline.

This is the algorithm of the original notebook (matmul distances, an ``[N, K]`` one-hot,
a dense ``[K, N] @ [N, D]`` matmul for the EMA sums) with its bugs fixed:

- the nearest code is the ``argmin`` of the distances (the notebook took the ``argmax``);
- the EMA state lives in buffers updated in place (the notebook re-created ``nn.Parameter`` s
  every step, which breaks optimizers, ``state_dict`` identity and device placement);
- low-precision inputs are computed in fp32 and the output is cast back.

Attribute names are the notebook's (``_embedding``, ``_ema_w``, ``_ema_cluster_size``), so
a state_dict of this module is a notebook-layout state_dict. Do not optimise this file.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _flatten(inputs: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """``[B, D, *spatial]`` -> ``[N, D]`` fp32, channels-last first."""
    return inputs.movedim(1, -1).reshape(-1, embedding_dim).float()


def _unflatten(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    shape = (like.shape[0], *like.shape[2:], like.shape[1])
    return flat.view(shape).movedim(-1, 1).contiguous().to(like.dtype)


def nearest_code(flat_input: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """The notebook's distances, ``[N, K]`` materialised, and their argmin (not argmax): int64 ``[N]``."""
    distances = (torch.sum(flat_input**2, dim=1, keepdim=True)
                 + torch.sum(embedding**2, dim=1)
                 - 2 * torch.matmul(flat_input, embedding.t()))
    return torch.argmin(distances, dim=1)


def _encode(flat_input: torch.Tensor, embedding: torch.Tensor):
    encoding_indices = nearest_code(flat_input, embedding).unsqueeze(1)
    encodings = torch.zeros(encoding_indices.shape[0], embedding.shape[0], device=flat_input.device)
    encodings.scatter_(1, encoding_indices, 1)
    quantized = torch.matmul(encodings, embedding)
    return encodings, quantized


def _perplexity(encodings: torch.Tensor) -> torch.Tensor:
    avg_probs = torch.mean(encodings, dim=0)
    return torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-10)))


class VectorQuantizer(nn.Module):
    """The notebook's plain quantizer (codebook loss), ``[N, K]`` matrices and all."""

    def __init__(self, num_embeddings, embedding_dim, commitment_cost):
        super().__init__()
        self._embedding_dim = embedding_dim
        self._num_embeddings = num_embeddings
        self._embedding = nn.Embedding(num_embeddings, embedding_dim)
        self._embedding.weight.data.uniform_(-1 / num_embeddings, 1 / num_embeddings)
        self._commitment_cost = commitment_cost

    def forward(self, inputs):
        flat_input = _flatten(inputs, self._embedding_dim)
        encodings, quantized = _encode(flat_input, self._embedding.weight)

        e_latent_loss = F.mse_loss(quantized.detach(), flat_input)
        q_latent_loss = F.mse_loss(quantized, flat_input.detach())
        loss = q_latent_loss + self._commitment_cost * e_latent_loss

        quantized = flat_input + (quantized - flat_input).detach()
        return loss, _unflatten(quantized, inputs), _perplexity(encodings), encodings


class VectorQuantizerEMA(nn.Module):
    """The notebook's EMA quantizer (no codebook loss), with its state updated in place."""

    def __init__(self, num_embeddings, embedding_dim, commitment_cost, decay, epsilon=1e-5):
        super().__init__()
        self._embedding_dim = embedding_dim
        self._num_embeddings = num_embeddings
        self._embedding = nn.Embedding(num_embeddings, embedding_dim)
        self._embedding.weight.data.normal_()
        self._embedding.weight.requires_grad_(False)
        self._commitment_cost = commitment_cost
        self.register_buffer("_ema_cluster_size", torch.zeros(num_embeddings))
        self.register_buffer("_ema_w", torch.randn(num_embeddings, embedding_dim))
        self._decay = decay
        self._epsilon = epsilon

    def forward(self, inputs):
        flat_input = _flatten(inputs, self._embedding_dim)
        encodings, quantized = _encode(flat_input, self._embedding.weight)

        if self.training:
            with torch.no_grad():
                self._ema_cluster_size.copy_(self._ema_cluster_size * self._decay
                                             + (1 - self._decay) * torch.sum(encodings, 0))
                n = torch.sum(self._ema_cluster_size)
                self._ema_cluster_size.copy_((self._ema_cluster_size + self._epsilon)
                                             / (n + self._num_embeddings * self._epsilon) * n)
                dw = torch.matmul(encodings.t(), flat_input)
                self._ema_w.copy_(self._ema_w * self._decay + (1 - self._decay) * dw)
                self._embedding.weight.copy_(self._ema_w / self._ema_cluster_size.unsqueeze(1))

        e_latent_loss = F.mse_loss(quantized.detach(), flat_input)
        loss = self._commitment_cost * e_latent_loss

        quantized = flat_input + (quantized - flat_input).detach()
        return loss, _unflatten(quantized, inputs), _perplexity(encodings), encodings


# --- lookup-free quantizers: FSQ (Mentzer et al., 2023) and LFQ (Yu et al., 2023) -------

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


def multiscale_residual_vq(f: torch.Tensor, codebook: torch.Tensor, scales, phis,
                           commitment_cost=0.25, upsample="bicubic"):
    """VAR's multi-scale residual quantization (Tian et al., 2024) of ``f: [B, D, H, W]``, as
    its ``VectorQuantizer2.forward``: for each size ``(h, w)`` of ``scales`` (coarse to
    fine), the rest ``f - f_hat`` area-downsampled (not when it is ``H x W``), each
    position's nearest code by the ``[N, K]`` distance matrix, the codes upsampled
    (``upsample``) to ``H x W``, through ``phis[s]`` (callables), added to ``f_hat``.

    ``loss = mean_s [beta * mse(sg(f_hat_s), f) + mse(f_hat_s, sg(f))]``; the output is
    ``f_hat`` with the identity's gradient. Returns ``(loss, f_hat, codes, rests)``: per
    scale, ``codes`` int64 ``[B, h, w]`` and the rows searched ``[B*h*w, D]`` (detached).
    """
    b, d, height, width = f.shape
    f_rest = f.detach().clone()
    f_hat = torch.zeros_like(f)
    loss, codes, rests = 0.0, [], []
    for s, (h, w) in enumerate(scales):
        rest = f_rest if (h, w) == (height, width) else F.interpolate(f_rest, size=(h, w), mode="area")
        rows = rest.permute(0, 2, 3, 1).reshape(-1, d)
        idx = nearest_code(rows, codebook.detach())
        codes.append(idx.view(b, h, w))
        rests.append(rows)
        q = codebook[idx].view(b, h, w, d).permute(0, 3, 1, 2)
        if (h, w) != (height, width):
            options = {} if upsample == "nearest" else {"align_corners": False}
            q = F.interpolate(q, size=(height, width), mode=upsample, **options)
        q = phis[s](q)
        f_hat = f_hat + q
        f_rest = f_rest - q.detach()
        loss = loss + commitment_cost * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach())
    return loss / len(scales), f + (f_hat - f).detach(), codes, rests


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


def simvq(x: torch.Tensor, basis: torch.Tensor, weight: torch.Tensor, commitment_cost=0.25):
    """SimVQ (Zhu et al., 2024) of ``x: [N, D]`` by brute force: the codebook is ``basis
    [K, d] @ weight^T`` (``weight [D, d]`` learned, ``basis`` frozen); the nearest code by
    squared distance; ``loss = mse(q, sg(x)) + commitment_cost * mse(sg(q), x)``; the output
    ``x + sg(q - x)``. Returns ``(out, loss, idx)``; gradients reach ``x`` and ``weight``."""
    codebook = basis @ weight.t()
    idx = nearest_code(x.detach(), codebook.detach())
    q = codebook[idx]
    loss = F.mse_loss(q, x.detach()) + commitment_cost * F.mse_loss(x, q.detach())
    return x + (q - x).detach(), loss, idx


def ibq(x: torch.Tensor, codebook: torch.Tensor, commitment_cost=0.25, scale=1.0):
    """Index backpropagation quantization (Shi et al., 2024) of ``x: [N, D]`` with plain
    ``[N, K]`` logits: ``p = softmax(scale * x @ E^T)``, ``idx = argmax``, the output
    ``(onehot(idx) - sg(p) + p) @ E`` (value ``E[idx]``, gradient through the softmax to
    ``x`` and every code); ``loss = mse(E[idx], sg(x)) + commitment_cost * mse(sg(E[idx]),
    x)``. Returns ``(out, loss, idx)``."""
    logits = scale * x @ codebook.t()
    p = torch.softmax(logits, dim=1)
    idx = logits.argmax(1)
    onehot = F.one_hot(idx, codebook.shape[0]).to(p.dtype)
    out = (onehot - p.detach() + p) @ codebook
    q = codebook[idx]
    loss = F.mse_loss(q, x.detach()) + commitment_cost * F.mse_loss(q.detach(), x)
    return out, loss, idx


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


def ema_step(cluster_size, ema_weight, counts, code_sums, decay, epsilon, cosine=False):
    """One EMA update of a codebook (the original notebook's formulas): ``cluster_size [K]``,
    ``ema_weight [K, d]`` and this batch's ``counts [K]``, ``code_sums [K, d]`` ->
    ``(cluster_size, ema_weight, codebook)``; the codes re-normalised when ``cosine``."""
    size = cluster_size * decay + (1 - decay) * counts
    n = size.sum()
    size = (size + epsilon) / (n + size.shape[0] * epsilon) * n
    weight = ema_weight * decay + (1 - decay) * code_sums
    codebook = weight / size[:, None]
    return size, weight, F.normalize(codebook, dim=1) if cosine else codebook
