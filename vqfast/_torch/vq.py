"""The single-codebook VQ ops: nearest code, gather and loss, EMA update, re-seeding, backward."""

import torch

from . import _common  # (_common._CHUNK_ELEMENTS: read at each call)
from ._common import (_chunks, _cpu_shortcut, _get, _put, _rows, _search_operands,
                      num_vectors)


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
    for rows, where in _chunks(x, x.shape[1], _common._CHUNK_ELEMENTS // 4):
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
    for rows, where in _chunks(x, x.shape[1], _common._CHUNK_ELEMENTS // 4):
        # [rows, D], reused in place as grad_x
        diff = codebook.index_select(0, idx[rows]).sub_(_get(x, where))
        if grad_codebook is not None:
            grad_codebook.index_add_(0, idx[rows], diff)
        _put(grad_x, where, diff.mul_(x_coef).add_(_get(grad_q, where)))
    if grad_codebook is not None:
        grad_codebook.mul_(grad_loss * codebook_scale)
    return grad_x, grad_codebook
