"""The lean torch backend: the fused ops of ``vqfast.kernels`` written with torch ops.

Same signatures as the Triton launchers. Never allocates ``[N, K]``: distances are taken
in row chunks of at most ``_CHUNK_ELEMENTS`` entries, counts with ``bincount`` and per-code
sums with ``index_add_``. Everything accumulates in fp32.
"""

import torch

# 1 Mi fp32 distances (4 MiB) per chunk: big enough for an efficient matmul, small enough
# that the distance buffer stays far below the reference's [N, K] matrices.
_CHUNK_ELEMENTS = 1 << 20


def _row_chunks(num_rows: int, row_elements: int):
    """Slices of at most ``_CHUNK_ELEMENTS // row_elements`` rows covering ``range(num_rows)``."""
    rows = max(1, _CHUNK_ELEMENTS // row_elements)
    return (slice(start, start + rows) for start in range(0, num_rows, rows))


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, precision: str = "ieee"):
    """``x: [N, D]``, ``codebook: [K, D]`` -> ``idx: int64 [N]``, ``sqdist: fp32 [N]``."""
    del precision  # torch's own matmul precision setting applies on this path
    codebook = codebook.float()
    num_codes = codebook.shape[0]
    codebook_sqnorm = codebook.pow(2).sum(1)
    codebook_t = codebook.t()
    idx = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    sqdist = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for rows in _row_chunks(x.shape[0], num_codes):
        x_chunk = x[rows].float()
        # |e|^2 - 2 x.e ; |x|^2 is constant per row and does not change the argmin.
        dist = torch.addmm(codebook_sqnorm, x_chunk, codebook_t, alpha=-2)
        best, best_idx = dist.min(dim=1)
        idx[rows] = best_idx
        sqdist[rows] = (best + x_chunk.pow(2).sum(1)).clamp_min_(0)
    return idx, sqdist


def gather_loss(x: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor, with_code_sums: bool):
    """``q = codebook[idx]`` in x's dtype, exact ``sum((q - x)^2)`` (fp32 0-d), per-code
    ``counts`` (int32 [K]) and, if asked, per-code sums of x (fp32 [K, D], else ``None``)."""
    codebook = codebook.float()
    q = torch.empty_like(x)
    sq_err = torch.zeros((), dtype=torch.float32, device=x.device)
    code_sums = torch.zeros(codebook.shape, dtype=torch.float32, device=x.device) if with_code_sums else None
    for rows in _row_chunks(x.shape[0], x.shape[1]):
        x_chunk = x[rows].float()
        q32 = codebook.index_select(0, idx[rows])
        q[rows] = q32
        if with_code_sums:
            code_sums.index_add_(0, idx[rows], x_chunk)
        sq_err += q32.sub_(x_chunk).pow_(2).sum()
    counts = torch.bincount(idx, minlength=codebook.shape[0]).to(torch.int32)
    return q, sq_err, counts, code_sums


def ema_update(counts, code_sums, total, ema_cluster_size, ema_weight, codebook, decay, epsilon):
    """In place: decay the EMA statistics towards this batch's, Laplace-smooth, renormalise.

    ``total`` is the fp32 0-d sum of the decayed cluster sizes (the ``n`` of the smoothing).
    """
    num_codes = codebook.shape[0]
    size = ema_cluster_size.float() * decay + (1 - decay) * counts.float()
    size = (size + epsilon) / (total + num_codes * epsilon) * total
    weight = ema_weight.float() * decay + (1 - decay) * code_sums
    ema_cluster_size.copy_(size)
    ema_weight.copy_(weight)
    codebook.copy_(weight / size.unsqueeze(1))


def quantize_backward(grad_q, grad_loss, x, q, idx, num_codes, x_scale, codebook_scale):
    """Straight-through + commitment gradient for x; scatter-added codebook gradient.

    ``grad_x = grad_q + grad_loss * x_scale * (x - q)``;
    ``grad_codebook[k] = grad_loss * codebook_scale * sum_{idx[n] == k} (q[n] - x[n])``
    (``None`` when ``codebook_scale == 0``).
    """
    diff = q.float() - x.float()  # [N, D], reused in place as grad_x
    grad_codebook = None
    if codebook_scale != 0:
        grad_codebook = torch.zeros(num_codes, x.shape[1], dtype=torch.float32, device=x.device)
        grad_codebook.index_add_(0, idx, diff)
        grad_codebook.mul_(grad_loss * codebook_scale)
    grad_x = diff.mul_(-(grad_loss * x_scale)).add_(grad_q)
    return grad_x.to(x.dtype), grad_codebook
