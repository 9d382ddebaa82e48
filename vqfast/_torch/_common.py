"""Shared by the torch backend's families: row chunks, the search operands, the CPU shortcuts' switch."""

import sys

import torch


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


def _cpu_shortcut(t: torch.Tensor) -> bool:
    """Whether to take a CPU shortcut: ``vqfast._torch.CPU_SHORTCUTS`` (read at each call,
    so the tests can switch it) and a CPU tensor."""
    return sys.modules[__package__].CPU_SHORTCUTS and t.device.type == "cpu"


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


def _rows(x: torch.Tensor) -> torch.Tensor:
    """fp32 rows ``[N, D]`` of ``[N, D]`` or channels-first ``[B, D, S]`` (a copy for the
    latter: export decompositions only)."""
    return (x if x.dim() == 2 else x.movedim(1, -1).reshape(-1, x.shape[1])).float()


def _normalize(r: torch.Tensor) -> torch.Tensor:
    """Rows of ``r`` over ``max(|r|, 1e-12)`` (``F.normalize``'s rule, shared with the kernels)."""
    return r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
