"""The lean torch backend: the fused ops of ``vqfast.kernels`` written with torch ops.

Same signatures as the Triton launchers: vectors come as ``[N, D]`` rows or channels-first
``[B, D, S]`` (vector ``n = b * S + s``). Never allocates ``[N, K]`` nor a flattened copy
of the input: every op walks the vectors in chunks of at most ``_CHUNK_ELEMENTS`` entries
(distances, differences), counts with a 1-D ``scatter_add_`` and sums per code with ``index_add_``.
Everything accumulates in fp32.
"""

import torch

from .reference import ROTATION_MIN_NORM_RATIO

# 1 Mi fp32 entries (4 MiB) per chunk: big enough for an efficient matmul, small enough
# that the temporaries stay far below the reference's [N, K] matrices. The elementwise
# passes (gather, backward) take a quarter of it per operand: they hold several at once.
_CHUNK_ELEMENTS = 1 << 20


def num_vectors(x: torch.Tensor) -> int:
    """N of an ``[N, D]`` or channels-first ``[B, D, S]`` tensor."""
    return x.numel() // x.shape[1]


def _as_bds(x: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` -> the view ``[N, D, 1]``; ``[B, D, S]`` as is."""
    return x.unsqueeze(-1) if x.dim() == 2 else x


def _chunks(x: torch.Tensor, row_elements: int, budget: int | None = None):
    """Cover the vectors of ``x`` in order with chunks of at most ``budget //
    row_elements`` vectors (budget: ``_CHUNK_ELEMENTS``): yields ``(rows, where)``, a slice
    of ``range(N)`` and the matching ``(batch, spatial)`` index into the ``[B, D, S]`` view."""
    b, _, s = _as_bds(x).shape
    rows = max(1, (budget or _CHUNK_ELEMENTS) // row_elements)
    if rows >= s:  # whole batch elements per chunk
        step = rows // s
        for b0 in range(0, b, step):
            b1 = min(b, b0 + step)
            yield slice(b0 * s, b1 * s), (slice(b0, b1), slice(None))
    else:  # a run of positions inside one batch element
        for bi in range(b):
            for s0 in range(0, s, rows):
                s1 = min(s, s0 + rows)
                yield slice(bi * s + s0, bi * s + s1), (slice(bi, bi + 1), slice(s0, s1))


def _get(x: torch.Tensor, where) -> torch.Tensor:
    """The chunk's vectors as ``[rows, D]`` fp32 (a view where the layout allows)."""
    x = _as_bds(x)
    return x[where[0], :, where[1]].movedim(1, -1).reshape(-1, x.shape[1]).float()


def _put(out: torch.Tensor, where, rows: torch.Tensor) -> None:
    """Write ``[rows, D]`` vectors into the chunk of ``out`` (any layout, out's dtype)."""
    target = _as_bds(out)[where[0], :, where[1]]
    target.copy_(rows.view(target.shape[0], target.shape[2], target.shape[1]).movedim(-1, 1))


# On the CPU, reading a value back costs nothing (there is no device to wait for): the torch
# path then takes shortcuts that read one (skip a copy no code needs, update only the
# codebooks a batch used). Off, every device takes the branch-free rule a CUDA device
# takes; the no-host-read tests switch them off to check that rule on the CPU.
CPU_SHORTCUTS = True


def _cpu_shortcut(t: torch.Tensor) -> bool:
    return CPU_SHORTCUTS and t.device.type == "cpu"


def _search_operands(codebook: torch.Tensor, shortcuts: bool = True):
    """``codebook: fp32 [..., K, D]`` -> ``(|e|^2 [..., K], codebook^T [..., D, K])`` for
    ``argmin(|e|^2 - 2 x.e)``. A code holding inf or NaN is infinitely far (as on the Triton
    path): its norm is inf and its column zero, so the matmul cannot turn it into
    inf - inf = NaN and win the min."""
    # one pass, no [K, D] temporary (pow(2).sum(-1) and vecdot make one: 15x slower)
    codebook_sqnorm = torch.linalg.vector_norm(codebook, dim=-1).square()
    # |e|^2 is finite exactly when every entry is and none overflows fp32 when squared (a
    # code that does is as far as an inf one: its column is zeroed too, so x.e cannot
    # overflow into inf - inf either). Zeroing the rows of such codes: a product with the
    # [K] mask (inf * 0 = NaN, then 0) costs a copy, where torch.where's broadcast and a
    # per-row all() cost ten. On the CPU (no device to wait for) the copy is made only when
    # some code needs it: two passes over the codebooks saved per call.
    finite_code = torch.isfinite(codebook_sqnorm)
    if shortcuts and _cpu_shortcut(codebook) and bool(finite_code.all()):
        return codebook_sqnorm, codebook.transpose(-1, -2)
    codebook_sqnorm = torch.where(finite_code, codebook_sqnorm, float("inf"))
    kept = (codebook * finite_code[..., None]).nan_to_num(0.0, 0.0, 0.0)
    return codebook_sqnorm, kept.transpose(-1, -2)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, precision: str = "ieee",
                 snapshot: torch.Tensor | None = None, zero: tuple | None = None):
    """``x: [N, D]`` or ``[B, D, S]``, ``codebook: [K, D]`` -> ``idx: int64 [N]``, ``sqdist: fp32 [N]``;
    ``snapshot`` (fp32 ``[K, D]``), if given, receives a copy of the codebook; the tensors
    of ``zero``, if given, are zeroed."""
    del precision  # torch's own matmul precision setting applies on this path
    if snapshot is not None:
        snapshot.copy_(codebook)
    for t in zero or ():
        if t is not None:
            t.zero_()
    codebook_sqnorm, codebook_t = _search_operands(codebook.float())
    num = num_vectors(x)
    idx = torch.empty(num, dtype=torch.int64, device=x.device)
    sqdist = torch.empty(num, dtype=torch.float32, device=x.device)
    for rows, where in _chunks(x, codebook.shape[0]):
        x_chunk = _get(x, where)
        # |e|^2 - 2 x.e ; |x|^2 is constant per row and does not change the argmin.
        dist = torch.addmm(codebook_sqnorm, x_chunk, codebook_t, alpha=-2)
        best, best_idx = dist.min(dim=1)
        idx[rows] = best_idx
        sqdist[rows] = (best + x_chunk.pow(2).sum(1)).clamp_min_(0)
    return idx, sqdist


def nearest_code_functional(x: torch.Tensor, codebook: torch.Tensor, backend: str = "torch",
                            precision: str = "ieee"):
    """``nearest_code`` in one functional expression (no chunks, no in-place writes): the
    ``vqfast::nearest_code`` op's decomposition for export (``vqfast.export_decompositions``),
    where a graph of standard ops is wanted. It builds the ``[N, K]`` distances: an exported
    graph's runtime decides how to tile them."""
    del backend, precision
    rows = _rows(x)
    codebook_sqnorm, codebook_t = _search_operands(codebook.float(), shortcuts=False)
    best, idx = torch.addmm(codebook_sqnorm, rows, codebook_t, alpha=-2).min(dim=1)
    return idx, (best + rows.pow(2).sum(1)).clamp_min(0)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """fp32 rows ``[N, D]`` of ``[N, D]`` or channels-first ``[B, D, S]`` (a copy for the
    latter: export decompositions only)."""
    return (x if x.dim() == 2 else x.movedim(1, -1).reshape(-1, x.shape[1])).float()


def gather_loss(x: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor, with_code_sums: bool,
                loss_scale: float = 1.0, code_sums: torch.Tensor | None = None,
                counts: torch.Tensor | None = None, usage=None):
    """``q = codebook[idx]`` in x's layout and dtype, ``loss = loss_scale * sum((q - x)^2)``
    (exact form, fp32 0-d), the perplexity of the code usage (fp32 0-d), per-code ``counts``
    (int32 [K]) and, if asked, per-code sums of x (fp32 [K, D], else ``None``; added into
    ``code_sums`` and ``counts`` (int32 ``[K + 1]``) if given, zeroed already);
    ``usage = (size, decay_weight, seed, decay)``: a learned codebook's usage EMA moved by
    the counts, in place (``seed`` is the Triton kernels')."""
    codebook = codebook.float()
    q = torch.empty_like(x)
    sq_err = torch.zeros((), dtype=torch.float32, device=x.device)
    if not with_code_sums:
        code_sums = None
    elif code_sums is None:
        code_sums = torch.zeros(codebook.shape, dtype=torch.float32, device=x.device)
    for rows, where in _chunks(x, x.shape[1], _CHUNK_ELEMENTS // 4):
        x_chunk = _get(x, where)
        q_chunk = codebook.index_select(0, idx[rows])
        _put(q, where, q_chunk)
        if with_code_sums:
            code_sums.index_add_(0, idx[rows], x_chunk)
        sq_err += q_chunk.sub_(x_chunk).pow_(2).sum()
    # Not bincount: on CUDA it reads max(idx) on the host. A 1-D scatter_add_ is
    # deterministic, and integer sums are exact.
    counts = (counts[:-1] if counts is not None else torch.zeros(
        codebook.shape[0], dtype=torch.int32, device=x.device)).scatter_add_(
        0, idx, torch.ones_like(idx, dtype=torch.int32))
    if usage is not None:
        size, decay_weight, _, decay = usage
        size.mul_(decay).add_(counts.float() * (1 - decay))
        decay_weight.mul_(decay).add_(1 - decay)
    return q, sq_err * loss_scale, perplexity(counts), counts, code_sums


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``exp(entropy)`` of the code usage ``counts [K]`` (the original's formula, fp32)."""
    avg_probs = counts.float() / counts.sum()
    return torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-10)))


def ema_update(counts, code_sums, loss, not_finite, ema_cluster_size, ema_weight, codebook,
               ema_decay_weight, skipped_batches, decay, epsilon, active=None, num_codes=None,
               x=None, seed=None, reseeded=None, threshold=0.0, size_rule=0):
    """In place: decay the EMA statistics towards this batch's, Laplace-smooth, renormalise;
    count the update in ``ema_decay_weight`` (``1 - decay**t``) or, when the batch's ``loss``
    is not finite (or a rank flagged ``not_finite``), leave the state and count a skipped
    batch. Returns ``applied`` (fp32, 1 or 0). Decided with ``torch.where``: no host sync.

    One codebook (``counts [K]``, ``code_sums [K, D]``, 0-d ``ema_decay_weight`` and
    ``skipped_batches``) or C of them (a leading ``[C]`` on every state tensor, ``applied
    [C]``); ``active`` (bool ``[C]`` or ``None``) leaves the inactive ones untouched;
    ``num_codes`` (int32 ``[C]`` or ``None``): codebook c's codes past ``num_codes[c]`` are
    padding (left as they are; the smoothing counts ``num_codes[c]`` codes).

    ``threshold > 0``: then dead-code re-seeding of the one codebook from random rows of
    ``x`` (``take_samples``; ``seed`` is the Triton kernels' Philox key, unused here).

    ``size_rule``: 0 stores the smoothed sizes (the original notebook's and Sonnet's rule);
    1 stores the decayed sizes as they are and smooths them only to divide (encodec's and
    vector-quantize-pytorch's); 2 stores them as they are and divides by ``max(size,
    epsilon)``, no smoothing (moshi's).
    """
    k = codebook.shape[-2]
    real = None
    if num_codes is not None:
        real = torch.arange(k, device=codebook.device) < num_codes[:, None]  # [C, K]
        num_codes = num_codes.float()[:, None]
    else:
        num_codes = k
    finite = torch.isfinite(loss)
    if not_finite is not None:
        finite = finite & ~not_finite
    apply = finite if active is None else finite & active
    size = ema_cluster_size.float() * decay + (1 - decay) * counts.float()
    if real is not None:
        size = torch.where(real, size, 0.0)
    total = size.sum(-1, keepdim=True)  # n of the Laplace smoothing: the sum of the decayed sizes
    if size_rule == 2:
        divisor = size.clamp_min(epsilon)
    else:
        divisor = (size + epsilon) / (total + num_codes * epsilon) * total
    if size_rule == 0:
        size = divisor
    if _cpu_shortcut(codebook) and real is None and ema_weight.dtype == torch.float32:
        _ema_codes_in_place(apply, size, divisor, code_sums, ema_cluster_size, ema_weight,
                            codebook, decay)
    else:
        _ema_codes(apply, size, divisor, code_sums, ema_cluster_size, ema_weight, codebook,
                   decay, real)
    ema_decay_weight.copy_(torch.where(apply, ema_decay_weight * decay + (1 - decay),
                                       ema_decay_weight))
    skipped_batches.add_((~finite).long())
    if threshold > 0:
        _reseed_dead(ema_cluster_size, ema_decay_weight, codebook, ema_weight, x, reseeded,
                     threshold, apply)
    return torch.broadcast_to(apply, ema_decay_weight.shape).float()


def _ema_codes(apply, size, divisor, code_sums, ema_cluster_size, ema_weight, codebook, decay,
               real):
    """The sizes, sums and codes of ``ema_update``, branch-free (no host read)."""
    weight = ema_weight.float() * decay + (1 - decay) * code_sums
    codebook_new = weight / divisor.unsqueeze(-1)
    per_code = apply.unsqueeze(-1)
    if real is not None:
        per_code = per_code & real
    ema_cluster_size.copy_(torch.where(per_code, size, ema_cluster_size))
    ema_weight.copy_(torch.where(per_code.unsqueeze(-1), weight, ema_weight))
    codebook.copy_(torch.where(per_code.unsqueeze(-1), codebook_new, codebook))


def _ema_codes_in_place(apply, size, divisor, code_sums, ema_cluster_size, ema_weight, codebook,
                        decay):
    """``_ema_codes`` on the CPU (``CPU_SHORTCUTS``: reading ``apply`` waits for nothing): the same
    arithmetic in place, codebook by codebook, on the codebooks updated only. Two passes
    over the ``[C, K, D]`` state where the branch-free rule makes nine, with as many
    fresh buffers (and the training step of a codec with 32 levels of 2048 x 256 codes
    spent most of its time there)."""
    if codebook.dim() == 3:  # (apply: [C], or 0-d for all of them)
        books = torch.broadcast_to(apply, codebook.shape[:1]).nonzero().flatten().tolist()
    else:
        books = [...] if bool(apply) else []
    for book in books:
        weight = ema_weight[book]
        weight.mul_(decay).add_((1 - decay) * code_sums[book])
        torch.div(weight, divisor[book].unsqueeze(-1), out=codebook[book])
        ema_cluster_size[book].copy_(size[book])


def reseed_codes(size, decay_weight, codebook, x, seed, reseeded, threshold):
    """A learned codebook's dead-code re-seeding, in place (the Triton launcher's rule; its
    Philox ``seed`` is unused here: rows from torch's generator)."""
    _reseed_dead(size, decay_weight, codebook, None, x, reseeded, threshold, decay_weight > 0)


def random_rows(x: torch.Tensor, count: int):
    """``count`` rows of ``x`` (``[N, D]`` or ``[B, D, S]``) drawn with replacement from
    torch's generator: ``(picks [count], rows fp32 [count, D])``."""
    b, _, s = x.shape if x.dim() == 3 else (x.shape[0], x.shape[1], 1)
    picks = torch.randint(b * s, (count,), device=x.device)
    return picks, x.view(b, -1, s)[picks // s, :, picks % s].float()


def _reseed_dead(size, decay_weight, codebook, ema_weight, x, reseeded, threshold, apply):
    """The dead-code rule, in place: codes whose bias-corrected size ``size / decay_weight``
    is below ``threshold`` (where ``apply``) take a random row of ``x`` (``take_samples``,
    starting at ``max(threshold, 1) * decay_weight``)."""
    dead = (size / decay_weight.clamp_min(1e-30) < threshold) & apply
    take_samples(dead, random_rows(x, size.shape[0])[1], max(threshold, 1.0) * decay_weight,
                 codebook, ema_weight, size, reseeded)


def take_samples(dead, samples, size, codebook, ema_weight, cluster_size, reseeded) -> None:
    """Re-seed the ``dead`` codes (bool ``[K]``) in place: ``codebook = samples [K, D]``,
    ``ema_weight = samples * size`` (when not ``None``), ``cluster_size = size``; count
    them in ``reseeded``."""
    codebook.copy_(torch.where(dead[:, None], samples.to(codebook.dtype), codebook))
    if ema_weight is not None:
        ema_weight.copy_(torch.where(dead[:, None], samples * size, ema_weight))
    cluster_size.copy_(torch.where(dead, size, cluster_size))
    reseeded.add_(dead.sum())


def quantize_backward(grad_q, grad_loss, x, codebook, idx, x_scale, codebook_scale,
                      grad_codebook=None):
    """Straight-through + commitment gradient for x; scatter-added codebook gradient.

    With ``q[n] = codebook[idx[n]]`` gathered in fp32 (never the output rounded to x's dtype):
    ``grad_x = grad_q + grad_loss * x_scale * (x - q)`` (x's layout and dtype);
    ``grad_codebook[k] = grad_loss * codebook_scale * sum_{idx[n] == k} (q[n] - x[n])``
    (fp32 ``[K, D]``, added into ``grad_codebook`` if given, zeroed; ``None`` when
    ``codebook_scale == 0``).
    """
    codebook = codebook.float()
    grad_x = torch.empty_like(x)
    if codebook_scale == 0:
        grad_codebook = None
    elif grad_codebook is None:
        grad_codebook = torch.zeros(codebook.shape, dtype=torch.float32, device=x.device)
    x_coef = -(grad_loss * x_scale)
    for rows, where in _chunks(x, x.shape[1], _CHUNK_ELEMENTS // 4):
        # [rows, D], reused in place as grad_x
        diff = codebook.index_select(0, idx[rows]).sub_(_get(x, where))
        if grad_codebook is not None:
            grad_codebook.index_add_(0, idx[rows], diff)
        _put(grad_x, where, diff.mul_(x_coef).add_(_get(grad_q, where)))
    if grad_codebook is not None:
        grad_codebook.mul_(grad_loss * codebook_scale)
    return grad_x, grad_codebook


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


def _normalize(r: torch.Tensor) -> torch.Tensor:
    """Rows of ``r`` over ``max(|r|, 1e-12)`` (``F.normalize``'s rule, shared with the kernels)."""
    return r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)


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
    for rows, where in _chunks(x, x.shape[1], _CHUNK_ELEMENTS // 4):
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


# --- FSQ --------------------------------------------------------------------------------

def _fsq_constants(params: torch.Tensor, c: int):
    """``params [4, C]`` (half_l, offset, shift, half_width) as ``[1, C, 1]`` broadcasts."""
    return [p.view(1, c, 1) for p in params]


def fsq_forward(z: torch.Tensor, params: torch.Tensor, basis: torch.Tensor):
    """``z: [N, C]`` or ``[B, C, S]`` -> ``quantized`` (z's layout and dtype), ``codes`` (int64 [N],
    -1 where z has a NaN)."""
    z3 = _as_bds(z)
    c = z3.shape[1]
    half_l, offset, shift, half_width = _fsq_constants(params, c)
    rounded = torch.round(torch.tanh(z3.float() + shift) * half_l - offset)
    q = (rounded / half_width).to(z.dtype).view(z.shape)
    nan = rounded.isnan()
    codes = ((rounded + half_width).masked_fill(nan, 0).long() * basis.view(1, c, 1)).sum(1)
    return q, codes.masked_fill(nan.any(1), -1).reshape(-1)  # -1: the input had a NaN


def fsq_backward(grad_q: torch.Tensor, z: torch.Tensor, params: torch.Tensor):
    """Straight-through gradient of the bound: ``grad * (1 - tanh^2(z + shift)) * half_l / half_width``."""
    z3 = _as_bds(z)
    half_l, _, shift, half_width = _fsq_constants(params, z3.shape[1])
    t = torch.tanh(z3.float() + shift)
    grad = _as_bds(grad_q).float() * (1 - t * t) * (half_l / half_width)
    return grad.to(z.dtype).view(z.shape)


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
    rows = max(1, _CHUNK_ELEMENTS // 2 ** (d - d // 2))
    for r0 in range(0, n, rows):
        yield slice(r0, min(n, r0 + rows))


def lfq_avg_prob(x, lse, inv_temperature, precision="ieee"):
    """``x: [N, d]`` -> ``avg: fp32 [2**d]``, ``mean_n p(c|x_n)``, as ``P^T Q / N`` over row
    chunks (never ``[N, 2**d]``). ``lse`` (the Triton path's operand) is implied here."""
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
    Q_n(b)`` (and the same for the other half)."""
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


# --- residual FSQ / residual LFQ ----------------------------------------------------------

def _residual_levels(z, params, scales, groups):
    """``z`` as fp32 ``[B, G, C, S]`` (a copy: the levels update it in place), FSQ's
    per-channel constants as ``[C, 1]`` broadcasts, and per level ``(1 / scale, scale)``."""
    z3 = _as_bds(z)
    b, channels, s = z3.shape
    c = channels // groups
    consts = [p.view(c, 1) for p in params]
    r = z3.to(torch.float32, copy=True).view(b, groups, c, s)
    return r, consts, [(sc.reciprocal().view(c, 1), sc.view(c, 1)) for sc in scales]


def _fsq_level(r, inv_scale, shift, half_l, offset):
    """``tanh(r / s + shift)`` and its rounded bound ``round(t * half_l - offset)``."""
    t = torch.addcmul(shift, r, inv_scale).tanh_()
    return t, (t * half_l).sub_(offset).round_()


def residual_scalar_forward(z, params, basis, scales, active, groups, sign, store_residuals,
                            store_slope=False):
    """``z: [N, G*C]`` or ``[B, G*C, S]`` -> ``quantized`` (z's layout and dtype: the sum of
    the levels), ``codes`` int64 ``[G*Q, N]`` (-1: a dropped level, or FSQ of a NaN input),
    ``residuals`` fp32 ``[G*Q, N, C]`` (each level's input; empty unless
    ``store_residuals``), ``slope`` fp32 in z's layout (FSQ: the summed bound derivative of
    the active levels; empty unless ``store_slope``). ``sign``: LFQ's levels (``params``
    unused) instead of FSQ's."""
    r, (half_l, offset, shift, half_width), level_scales = _residual_levels(z, params, scales, groups)
    b, _, c, s = r.shape
    nan = r.isnan().any(2) if not sign else None  # FSQ: a NaN input stays NaN at every level
    total = torch.zeros_like(r)
    slope = torch.zeros_like(r) if store_slope and not sign else None
    codes, residuals = [], []
    place = basis.to(torch.float64).view(c, 1)  # (codes sum exactly below 2**53)
    for level, (inv_scale, scale) in enumerate(level_scales):
        on = (level < active).float()
        if store_residuals:
            residuals.append(r.clone())
        if sign:
            positive = r > 0
            q = torch.where(positive, scale, -scale)
            digit = positive
        else:
            t, rounded = _fsq_level(r, inv_scale, shift, half_l, offset)
            q = rounded * (scale / half_width)
            if slope is not None:
                slope.add_(t.square_().neg_().add_(1.0).mul_(on * half_l / half_width))
            digit = rounded.add_(half_width)
        codes.append(torch.einsum("bgcs,c->bgs", digit.double(), place.view(-1)))  # [B, G, S]
        q.mul_(on)
        total.add_(q)
        r.sub_(q)
    level_on = torch.arange(len(level_scales), device=r.device) < active
    codes = torch.stack(codes, 2).long().masked_fill(~level_on.view(-1, 1), -1)  # [B, G, Q, S]
    if nan is not None:
        codes = codes.masked_fill(nan[:, :, None], -1)
    codes = codes.permute(1, 2, 0, 3).reshape(-1, b * s)
    if store_residuals:  # [B, G, C, S] per level -> rows [G*Q, N, C]
        rows = torch.stack(residuals, 2).permute(1, 2, 0, 4, 3).reshape(-1, b * s, c)
    else:
        rows = r.new_empty(0)
    shape = _as_bds(z).shape
    slope = r.new_empty(0) if slope is None else slope.view(shape).view(z.shape)
    return total.view(shape).to(z.dtype).view(z.shape), codes, rows.contiguous(), slope


def residual_fsq_backward(grad_q, z, params, scales, active, groups):
    """The straight-through gradient of every active level's bound: ``grad_z`` (z's layout
    and dtype)."""
    r, (half_l, offset, shift, half_width), level_scales = _residual_levels(z, params, scales, groups)
    slope = torch.zeros_like(r)
    for level, (inv_scale, scale) in enumerate(level_scales):
        on = (level < active).float()
        t, rounded = _fsq_level(r, inv_scale, shift, half_l, offset)
        slope.add_(t.square_().neg_().add_(1.0).mul_(on * half_l / half_width))
        r.sub_(rounded.mul_(on * scale / half_width))
    grad = _as_bds(grad_q).float().view(r.shape) * slope
    return grad.view(_as_bds(z).shape).to(z.dtype).view(z.shape)


# --- IBQ: the softmax over all codes, streamed over code tiles -----------------------------

_IBQ_TILE_ELEMENTS = 1 << 22  # logits per tile: rows x codes


def _ibq_code_tiles(k: int, n: int):
    codes = max(1, min(k, _IBQ_TILE_ELEMENTS // max(n, 1)))
    for c0 in range(0, k, codes):
        yield c0, min(k, c0 + codes)


@torch.no_grad()
def ibq_forward_functional(x, codebook, scale, argmax_only, backend="torch"):
    """``ibq_forward`` in functional form over all codes at once: the ``vqfast::ibq_forward``
    op's decomposition for export (``vqfast.export_decompositions``)."""
    del backend
    logits = (x @ codebook.t()).mul(scale)
    idx = logits.argmax(1)  # the first maximum, as the tiled search
    if argmax_only:
        return idx, x.new_empty(0), x.new_empty(0)
    return idx, torch.logsumexp(logits, 1), torch.softmax(logits, 1) @ codebook


def ibq_forward(x: torch.Tensor, codebook: torch.Tensor, scale: float, argmax_only=False):
    """``x fp32 [N, D]``, ``codebook fp32 [K, D]`` -> ``idx int64 [N]`` (argmax of the
    logits), ``lse fp32 [N]`` (their log-sum-exp) and ``soft fp32 [N, D]`` (``p @ E``);
    with ``argmax_only`` (encoding) the last two empty, no exponentials."""
    n = x.shape[0]
    best = torch.full((n,), -float("inf"), device=x.device)  # the running max of the logits
    idx = torch.zeros(n, dtype=torch.int64, device=x.device)
    running_sum = torch.zeros(n, device=x.device)  # sum of exp(logit - best)
    soft = torch.zeros_like(x)  # sum of exp(logit - best) * code
    for c0, c1 in _ibq_code_tiles(codebook.shape[0], n):
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
        return idx, x.new_empty(0), x.new_empty(0)
    return idx, best + torch.log(running_sum), soft / running_sum[:, None]


@torch.no_grad()
def ibq_backward(grad: torch.Tensor, x: torch.Tensor, codebook: torch.Tensor, idx, lse, soft,
                 scale: float):
    """``(grad_x fp32 [N, D], grad_codebook fp32 [K, D])`` of the output for its gradient
    ``grad [N, D]``, the logits recomputed tile by tile.

    The centre ``c_n = sum_k p_nk (g_n . e_k) / sum_k p_nk`` is summed from the same ``g .
    e_k`` as the ``dlogits = p (g . e_k - c)`` it centres (not ``g . (p @ E)`` from the
    forward's running sum, which rounds otherwise): where p is one-hot in fp32 the softmax
    path's gradient is then exactly 0, as it truly is (at ``logit_scale = 1e4`` the
    difference of roundings, times the scale, was most of the input's gradient); dividing
    by the recomputed p's own sum keeps the centring exact where that sum is not 1 to
    within the logits' rounding. ``grad_x = scale * (sum_k p_k (g . e_k) e_k / sum_k p_k -
    c (p @ E))`` in the first pass; the codebook's needs the final ``c``, so a second pass
    recomputes the tiles (kept when there is only one)."""
    n = x.shape[0]
    tiles = list(_ibq_code_tiles(codebook.shape[0], n))
    total = torch.zeros(n, device=x.device)  # sum_k p_k
    centre = torch.zeros(n, device=x.device)
    weighted = torch.zeros_like(x)  # sum_k p_k (g . e_k) e_k
    kept = None
    for c0, c1 in tiles:
        p, ge = _ibq_tile(grad, x, codebook[c0:c1], lse, scale)
        pg = p * ge
        total += p.sum(1)
        centre += pg.sum(1)
        weighted.addmm_(pg, codebook[c0:c1])
        kept = (p, ge) if len(tiles) == 1 else None
    grad_x = weighted.sub_(centre[:, None] * soft).mul_((scale / total)[:, None])
    centre /= total
    grad_codebook = torch.zeros_like(codebook).index_add_(0, idx, grad)  # onehot^T g
    for c0, c1 in tiles:
        p, ge = kept or _ibq_tile(grad, x, codebook[c0:c1], lse, scale)
        dlogits = p.mul_(ge.sub_(centre[:, None])).mul_(scale)
        grad_codebook[c0:c1] += dlogits.t() @ x
    return grad_x, grad_codebook


def _ibq_tile(grad, x, book, lse, scale):
    """A tile of codes ``book [tile, D]``: ``p [N, tile]`` (recomputed softmax) and ``g .
    e_k [N, tile]``."""
    return (x @ book.t()).mul_(scale).sub_(lse[:, None]).exp_(), grad @ book.t()
