"""Residual / grouped / cosine VQ: every level of every group, and its backward."""

import torch

from . import _common  # (_common._CHUNK_ELEMENTS: read at each call)
from ..reference.residual import ROTATION_MIN_NORM_RATIO
from ._common import (_chunks, _get, _normalize, _put, _rows, _search_operands,
                      num_vectors)


# --- residual / grouped VQ -------------------------------------------------------------

def book_of(group: int, level: int, num_levels: int, num_books: int, groups: int) -> int:
    """The codebook of ``(group, level)`` in ``[G * C, K, d]``: ``C = num_levels`` books per
    group, or one shared by its levels (``C = 1``)."""
    return group if num_books == groups else group * num_levels + level


def rotation_grad(e: torch.Tensor, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The rotation trick's gradient for rows ``e, q, g: [N, d]``: ``lambda R^T g`` with
    ``lambda = |q| / |e|``, ``R`` the rotation of ``e^`` onto ``q^``:
    ``R^T g = g - 2 r (r.g) + 2 e^ (q^.g)``, ``r = (e^ + q^) / |e^ + q^|`` (its norm summed
    elementwise: from row sums, sqrt(2 + 2 cos) cancels near e^ = -q^); ``g`` straight
    through where ``|e| < ROTATION_MIN_NORM_RATIO * |q|`` (``vqfast.reference``)."""
    e_norm = e.norm(dim=1, keepdim=True)
    q_norm = q.norm(dim=1, keepdim=True)
    degenerate = e_norm < ROTATION_MIN_NORM_RATIO * q_norm
    e_norm = e_norm.clamp_min(1e-12)
    e_hat, q_hat = e / e_norm, q / q_norm.clamp_min(1e-12)
    r = e_hat + q_hat
    # within rounding of antiparallel r's direction is noise: r = 0 there (R = I - 2 e^ e^T)
    r_norm = r.norm(dim=1, keepdim=True)
    r = torch.where(r_norm > 1e-6, r / r_norm.clamp_min(1e-6), 0.0)
    rotated = (g - 2 * r * (r * g).sum(1, keepdim=True)
               + 2 * e_hat * (q_hat * g).sum(1, keepdim=True))
    return torch.where(degenerate, g, rotated * (q_norm / e_norm))


def _level_weight(level_on, valid):
    """Which rows a level quantizes (fp32 ``[rows]``, or ``None`` for all): ``level_on``
    (0-d bool, the level is active) and ``valid`` (bool ``[rows]``, the mask), either None."""
    if level_on is None and valid is None:
        return None
    if valid is None:
        return level_on.float().expand(1)
    return (valid & level_on if level_on is not None else valid).float()


def _search_level(r, book, cosine, sqnorms, codebooks, codebooks_t, raw_codes=False):
    """One level's search of the residual rows ``r``: ``(r~ (normalised when cosine, not
    with raw_codes), the nearest codes of codebook ``book``, their values)``. ``raw_codes``:
    the search is cosine (``sqnorms``/``codebooks_t`` of the normalised codebooks), the
    residual and the codes stay as they are."""
    searched = _normalize(r) if cosine or raw_codes else r
    i = torch.addmm(sqnorms[book], searched, codebooks_t[book], alpha=-2).argmin(1)
    return (r if raw_codes else searched), i, codebooks[book].index_select(0, i)


def _residual_search_operands(codebooks, raw_codes, shortcuts=True):
    """``_search_operands`` of the codebooks searched (l2-normalised for ``raw_codes``)."""
    return _search_operands(_normalize_codes(codebooks) if raw_codes else codebooks, shortcuts)


def _normalize_codes(codebooks: torch.Tensor) -> torch.Tensor:
    """Codes (rows of ``[..., K, d]``) over ``max(|c|, 1e-12)``."""
    return codebooks / codebooks.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def residual_codes(x, codebooks, num_levels, groups, cosine, mask, precision="ieee",
                   raw_codes=False):
    """The codes of ``residual_quantize`` alone, ``idx`` int64 ``[G*Q, N]`` (-1 where
    ``mask`` is False): each level's search and the residual it leaves, no losses, counts
    or output (an encoder's work)."""
    del precision
    books, k, d = codebooks.shape
    codebooks = codebooks.float()
    sqnorms, codebooks_t = _residual_search_operands(codebooks, raw_codes)
    idx = torch.empty(groups * num_levels, num_vectors(x), dtype=torch.int64, device=x.device)
    for rows, where in _chunks(x, max(k, x.shape[1])):
        x_chunk = _get(x, where)
        for g in range(groups):
            r = x_chunk[:, g * d:(g + 1) * d].clone()
            for level in range(num_levels):
                slot, book = g * num_levels + level, book_of(g, level, num_levels, books, groups)
                _, i, code = _search_level(r, book, cosine, sqnorms, codebooks, codebooks_t,
                                           raw_codes)
                idx[slot, rows] = i if mask is None else torch.where(mask[rows], i, -1)
                r -= code
    return idx


def residual_codes_functional(x, codebooks, num_levels, groups, cosine, mask, backend="torch",
                              precision="ieee", raw_codes=False):
    """``residual_codes`` in functional form (whole rows, no in-place writes): the
    ``vqfast::residual_codes`` op's decomposition for export (``vqfast.export_decompositions``).
    The same searches in the same order as ``residual_codes``."""
    del backend, precision
    rows = _rows(x)
    books, _, d = codebooks.shape
    codebooks = codebooks.float()
    sqnorms, codebooks_t = _residual_search_operands(codebooks, raw_codes, shortcuts=False)
    codes = []
    for g in range(groups):
        r = rows[:, g * d:(g + 1) * d]
        for level in range(num_levels):
            book = book_of(g, level, num_levels, books, groups)
            _, i, code = _search_level(r, book, cosine, sqnorms, codebooks, codebooks_t,
                                       raw_codes)
            codes.append(i if mask is None else torch.where(mask, i, -1))
            r = r - code
    return torch.stack(codes)


def residual_quantize(x, codebooks, num_levels, groups, cosine, active, mask, with_code_sums,
                      precision="ieee", snapshot=None, raw_codes=False):
    """Residual VQ of ``x: [N, D]`` or ``[B, D, S]`` with ``codebooks: [G * C, K, D / G]``:
    for each group, ``num_levels`` levels, each quantizing what the levels before it left
    (l2-normalised when ``cosine``), in row chunks (never ``[N, K]``).

    ``active``: int64 0-d (levels that run) or ``None``; ``mask``: bool ``[N]`` or ``None``.
    Returns ``q`` (x's layout and dtype: the sum of the codes, ``x`` on masked rows),
    ``idx`` (int64 ``[G*Q, N]``, -1 where masked or inactive), ``sq_err`` (fp32 ``[G*Q]``:
    ``sum |q_l - r~_l|^2`` per level), ``counts`` (int32 ``[G*Q, K]``), ``code_sums`` (fp32
    ``[G*Q, K, D/G]``, per-code sums of ``r~_l``; ``None`` unless ``with_code_sums``).
    ``snapshot``, if given, receives an fp32 copy of the codebooks. ``raw_codes``: the
    search is cosine, the residuals, codes and statistics raw (``cosine`` is then unread).
    """
    del precision
    if snapshot is not None:
        snapshot.copy_(codebooks)
    books, k, d = codebooks.shape
    codebooks = codebooks.float()
    sqnorms, codebooks_t = _residual_search_operands(codebooks, raw_codes)
    n, slots = num_vectors(x), groups * num_levels
    idx = torch.empty(slots, n, dtype=torch.int64, device=x.device)
    sq_err = torch.zeros(slots, dtype=torch.float32, device=x.device)
    counts = torch.zeros(slots, k, dtype=torch.int32, device=x.device)
    code_sums = (torch.zeros(slots, k, d, dtype=torch.float32, device=x.device)
                 if with_code_sums else None)
    levels_on = (None if active is None
                 else torch.arange(num_levels, device=x.device) < active)
    q = torch.empty_like(x)
    for rows, where in _chunks(x, max(k, x.shape[1])):
        x_chunk = _get(x, where)
        valid = mask[rows] if mask is not None else None
        out = torch.empty_like(x_chunk)
        for g in range(groups):
            x_g = x_chunk[:, g * d:(g + 1) * d]
            r, total = x_g.clone(), torch.zeros_like(x_g)
            for level in range(num_levels):
                slot, book = g * num_levels + level, book_of(g, level, num_levels, books, groups)
                r_used, i, code = _search_level(r, book, cosine, sqnorms, codebooks,
                                                codebooks_t, raw_codes)
                err = (code - r_used).pow_(2).sum(1)
                weight = _level_weight(None if levels_on is None else levels_on[level], valid)
                if weight is not None:  # where, not a product: 0 * inf (padding) is NaN
                    on = weight > 0
                    err = torch.where(on, err, 0.0)
                    code = torch.where(on[:, None], code, 0.0)
                    r_used = torch.where(on[:, None], r_used, 0.0)
                    idx[slot, rows] = torch.where(on, i, -1)
                else:
                    idx[slot, rows] = i
                sq_err[slot] += err.sum()
                counts[slot].scatter_add_(0, i, (weight if weight is not None
                                                 else torch.ones_like(err)).int().expand_as(i))
                if with_code_sums:
                    code_sums[slot].index_add_(0, i, r_used)
                r -= code
                total += code
            out[:, g * d:(g + 1) * d] = total if valid is None else torch.where(
                valid[:, None], total, x_g)
        _put(q, where, out)
    return q, idx, sq_err, counts, code_sums


def residual_backward(grad_q, grad_scale, x, codebooks, idx, num_levels, groups, cosine,
                      rotation_trick, x_scale, codebook_scale, commit_levels=None):
    """Gradients of residual VQ from the codes ``idx [G*Q, N]`` (gathered again in fp32).

    ``grad_x = G + grad_scale * x_scale * sum_l dr~_l/dr_l^T (r~_l - q_l)`` with ``G`` the
    output's gradient straight through (``grad_q``) or rotated (``rotation_trick``: the
    rotation of each group's ``x_g`` onto its sum of codes); ``grad_codebooks[book][k] =
    grad_scale * codebook_scale * sum_{idx_l[n] = k} (q_l - r~_l)[n]`` (fp32; ``None``
    when ``codebook_scale == 0``). ``grad_scale``: fp32 0-d, read on the device.
    ``commit_levels``: only each group's first ``commit_levels`` levels' commitment terms
    reach ``x`` (default all; 1: encodec's and moshi's detached residuals).
    """
    commit_levels = num_levels if commit_levels is None else commit_levels
    books, k, d = codebooks.shape
    codebooks = codebooks.float()
    grad_x = torch.empty_like(x)
    grad_codebooks = (torch.zeros(books, k, d, dtype=torch.float32, device=x.device)
                      if codebook_scale != 0 else None)
    x_coef = grad_scale * x_scale
    for rows, where in _chunks(x, x.shape[1], _common._CHUNK_ELEMENTS // 4):
        x_chunk, g_chunk = _get(x, where), _get(grad_q, where)
        out = torch.empty_like(x_chunk)
        for g in range(groups):
            x_g = x_chunk[:, g * d:(g + 1) * d]
            r, total, acc = x_g.clone(), torch.zeros_like(x_g), torch.zeros_like(x_g)
            for level in range(num_levels):
                book = book_of(g, level, num_levels, books, groups)
                i = idx[g * num_levels + level, rows]
                on = (i >= 0)[:, None]
                i = i.clamp_min(0)
                code = torch.where(on, codebooks[book].index_select(0, i), 0.0)
                if cosine:  # d/dr |r^ - q|^2 / 2 = (r^ (r^.q) - q) / |r|
                    norm = r.norm(dim=1, keepdim=True).clamp_min(1e-12)
                    r_hat = r / norm
                    step = (r_hat * (r_hat * code).sum(1, keepdim=True) - code) / norm
                    diff = code - r_hat
                else:
                    step, diff = r - code, code - r
                if level < commit_levels:
                    acc += torch.where(on, step, 0.0)
                if grad_codebooks is not None:
                    grad_codebooks[book].index_add_(0, i, torch.where(on, diff, 0.0))
                r -= code
                total += code
            g_out = g_chunk[:, g * d:(g + 1) * d]
            if rotation_trick:
                valid = (idx[g * num_levels, rows] >= 0)[:, None]
                g_out = torch.where(valid, rotation_grad(x_g, total, g_out), g_out)
            out[:, g * d:(g + 1) * d] = g_out + x_coef * acc
        _put(grad_x, where, out)
    if grad_codebooks is not None:
        grad_codebooks.mul_(grad_scale * codebook_scale)
    return grad_x, grad_codebooks


def level_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``[L, K]`` per-level code counts -> fp32 ``[L]`` perplexities (the notebook's formula;
    1 for a level that quantized nothing)."""
    p = counts.float() / counts.sum(1, keepdim=True).clamp_min(1)
    return torch.exp(-torch.sum(p * torch.log(p + 1e-10), dim=1))


# --- dead-code re-seeding ----------------------------------------------------------------

def reseed_samples(z, idx, snapshot, picks, groups, num_levels, shared, cosine):
    """The residual each codebook's level quantized for rows ``picks [K]`` of ``z: [B, D',
    S]``, rebuilt from the codes ``idx [G*Q, N]`` and the codebooks they were taken from
    ``snapshot [G*C, K, d]``: fp32 ``[G*C, K, d]`` (unit vectors when ``cosine``; a shared
    codebook takes its group's first level, the input itself) and whether that level
    quantized the row (bool ``[G*C, K]``)."""
    g, q = groups, num_levels
    d, s = snapshot.shape[-1], z.shape[2]
    rows = z[picks // s, :, picks % s].float().view(-1, g, d).transpose(0, 1)  # [G, K, d]
    codes = idx[:, picks]  # [G*Q, K]
    used = codes >= 0
    if shared:  # its group's first level: nothing taken away yet
        residual, used = rows, used.view(g, q, -1)[:, 0]
    else:
        gathered = (snapshot[torch.arange(g * q, device=z.device)[:, None], codes.clamp_min(0)]
                    * used[..., None]).view(g, q, -1, d)
        # what the earlier levels took away: their codes summed in level order
        before = torch.cat([torch.zeros_like(gathered[:, :1]), gathered[:, :-1].cumsum(1)], 1)
        residual = (rows[:, None] - before).reshape(g * q, -1, d)
    if cosine:
        residual = torch.nn.functional.normalize(residual, dim=-1)
    return residual, used


def apply_reseed(samples, used, size, decay_weight, applied, codebooks, ema_weight, reseeded,
                 real_codes, threshold):
    """The dead-code rule of every codebook, in place: a code of an ``applied`` codebook
    whose bias-corrected size ``size / decay_weight`` is below ``threshold`` (and, with
    ``real_codes``, a real one) takes its sample where ``used``, at a size of ``max(threshold,
    1) * decay_weight``; ``reseeded [G*C]`` counts them."""
    dead = (size / decay_weight.clamp_min(1e-30)[:, None] < threshold) & (applied[:, None] > 0)
    dead = dead & used
    if real_codes is not None:
        dead = dead & real_codes
    start = max(threshold, 1.0) * decay_weight[:, None]
    codebooks.copy_(torch.where(dead[..., None], samples, codebooks))
    ema_weight.copy_(torch.where(dead[..., None], samples * start[..., None], ema_weight))
    size.copy_(torch.where(dead, start, size))
    reseeded.add_(dead.sum(1))


def residual_reseed(z, idx, snapshot, picks, size, decay_weight, applied, codebooks, ema_weight,
                    reseeded, real_codes, threshold, groups, num_levels, shared, cosine):
    """``ResidualVQ``'s dead-code re-seeding after its EMA update, in place: ``codebooks``,
    ``ema_weight`` ``[G*C, K, d]``, ``size [G*C, K]``, ``reseeded`` int64 ``[G*C]``, from the
    batch's rows ``picks [K]`` (one per code, the same for every codebook) as their levels
    saw them (``reseed_samples``); ``applied`` fp32 ``[G*C]`` (the EMA update's: 0 leaves a
    codebook as it is); ``real_codes`` bool ``[G*C, K]`` or ``None``."""
    samples, used = reseed_samples(z, idx, snapshot, picks, groups, num_levels, shared, cosine)
    apply_reseed(samples, used, size, decay_weight, applied, codebooks, ema_weight, reseeded,
                 real_codes, threshold)
