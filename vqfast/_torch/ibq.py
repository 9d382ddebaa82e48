"""IBQ: the softmax over all codes, streamed over code tiles."""

import torch


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
