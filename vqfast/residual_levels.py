"""``ResidualVQ`` level by level: per-level projections and temporal strides (DAC,
descript-audio-codec, SNAC). Each level projects the residual that reaches it into its own
code space (after pooling it by its stride), runs the fused single-level op (search,
gather, losses, straight-through; never ``[N, K]``), projects the code back (and repeats it
over its stride) and subtracts it: the next level's residual keeps its gradient through
the projections, as in DAC. Only what differs from the fused all-levels path lives here."""

import math

import torch
import torch.nn.functional as F

from .modules import LossBreakdown, adopt_kmeans, real_rows, without_real_rows_nan
from .ops.residual_vq import residual_codes, residual_quantize


def _stride(rvq, level: int) -> int:
    return rvq.level_strides[level] if rvq.level_strides is not None else 1


def _project_in(rvq, level: int, residual: torch.Tensor) -> torch.Tensor:
    """What level ``level`` quantizes: the residual pooled by its stride, projected."""
    stride = _stride(rvq, level)
    if stride > 1:
        residual = F.avg_pool1d(residual, stride, stride)
    if rvq.level_projections:
        residual = rvq.project_in[level](residual)
    return residual.contiguous()


def _project_out(rvq, level: int, q: torch.Tensor) -> torch.Tensor:
    """A level's codes ``[B, d, T / stride]`` back in the inputs' space ``[B, D, T]``."""
    if rvq.level_projections:
        q = rvq.project_out[level](q)
    stride = _stride(rvq, level)
    return q.repeat_interleave(stride, dim=-1) if stride > 1 else q


def _spread(rvq, level: int, idx: torch.Tensor, batch: int) -> torch.Tensor:
    """A level's codes ``[1, B * T / stride]`` -> ``[B, T]`` (each repeated over its stride)."""
    codes = idx.view(batch, -1)
    stride = _stride(rvq, level)
    return codes.repeat_interleave(stride, dim=-1) if stride > 1 else codes


def _prepare(rvq, inputs, mask):
    """``ResidualVQ._prepare`` (the inputs unprojected), then the strides' own checks."""
    x, _, flat_mask, backend = rvq._prepare(inputs, mask)
    if rvq.level_strides is not None:
        if inputs.dim() != 3:
            raise ValueError(f"level_strides pool sequences: inputs must be [B, D, T], got "
                             f"shape {tuple(inputs.shape)}")
        if flat_mask is not None:
            raise ValueError("level_strides pool over time: masks are not supported with them")
        step = math.lcm(*rvq.level_strides)
        if x.shape[-1] % step:
            raise ValueError(f"level_strides={rvq.level_strides}: the length T={x.shape[-1]} "
                             f"must be a multiple of every stride (pad it to one of {step})")
    return x, flat_mask, backend


def _book(rvq, codebooks: torch.Tensor, level: int) -> torch.Tensor:
    """Level ``level``'s codebook as ``[1, K, d]``."""
    book = 0 if rvq.shared_codebook else level
    return codebooks[book:book + 1]


def forward(rvq, inputs, mask, n: int, breakdown: bool):
    """``ResidualVQ.forward`` with per-level projections or strides (see its docstring)."""
    x, flat_mask, backend = _prepare(rvq, inputs, mask)
    if rvq.training and not rvq._kmeans_done and not rvq.freeze_codebook:
        _kmeans(rvq, x, flat_mask, backend)
    active = (rvq._active_levels(x.device, n) if rvq.training and rvq.quantize_dropout
              else None)
    codebooks = rvq._codebooks()
    keep = flat_mask.view(x.shape[0], 1, -1) if flat_mask is not None else None
    residual, total = x, torch.zeros_like(x)
    loss = commitment = x.new_zeros((), dtype=torch.float32)
    codes, perplexities = [], []
    options = dict(cosine=rvq.cosine is True, raw_codes=rvq.cosine == "search",
                   commitment_cost=rvq.commitment_cost, backend=backend, precision=rvq.precision)
    for level in range(n):
        z = _project_in(rvq, level, residual)
        book = _book(rvq, codebooks, level)
        q, level_loss, idx, perplexity, counts, _, _ = residual_quantize(
            z, book, 1, mask=flat_mask, codebook_loss=True, rotation_trick=rvq.rotation_trick,
            **options)
        if breakdown:  # the commitment alone, with its own gradient: a second search
            level_commitment = residual_quantize(z, book.detach(), 1, mask=flat_mask,
                                                 codebook_loss=False, **options)[1]
        if level == 0:
            rvq._watch_usage(counts)
        out = _project_out(rvq, level, q)
        level_codes = _spread(rvq, level, idx, x.shape[0])
        if active is not None:  # quantize dropout: the level counts only if it ran
            on = level < active
            out, level_loss = out * on, level_loss * on
            level_codes = torch.where(on, level_codes, -1)
            perplexity = torch.where(on, perplexity, 1.0)
            if breakdown:
                level_commitment = level_commitment * on
        if keep is not None:  # masked positions: no level adds anything
            out = torch.where(keep, out, 0.0)
        total = total + out
        residual = residual - out
        loss = loss + level_loss
        if breakdown:
            commitment = commitment + level_commitment
        codes.append(level_codes)
        perplexities.append(perplexity)
    q = total if keep is None else torch.where(keep, total, x)
    idx = torch.stack(codes, 1).view(x.shape[0], n, *inputs.shape[2:])  # [B, n, *spatial]
    outputs = (loss, q.to(inputs.dtype).view(inputs.shape), torch.cat(perplexities), idx)
    if not breakdown:
        return outputs
    return (*outputs, LossBreakdown.of(loss, commitment=commitment.float(),
                                       codebook=(loss - commitment).float()))


@torch.no_grad()
def encode(rvq, inputs, mask, n: int) -> torch.Tensor:
    """``ResidualVQ.encode`` level by level: each level's search only, ``[B, n, T]``."""
    x, flat_mask, backend = _prepare(rvq, inputs, mask)
    codebooks = rvq._codebooks().detach()
    residual, codes = x, []
    for level in range(n):
        z = _project_in(rvq, level, residual)
        book = _book(rvq, codebooks, level)
        idx = residual_codes(z, book, 1, cosine=rvq.cosine is True, mask=flat_mask,
                             backend=backend, precision=rvq.precision,
                             raw_codes=rvq.cosine == "search")
        codes.append(_spread(rvq, level, idx, x.shape[0]))
        if level + 1 < n:
            residual = residual - _decoded_level(rvq, codebooks, level, idx.view(x.shape[0], -1))
    return torch.stack(codes, 1).view(x.shape[0], n, *inputs.shape[2:])


def _decoded_level(rvq, codebooks, level: int, codes: torch.Tensor) -> torch.Tensor:
    """Level ``level``'s codes ``[B, T / stride]`` (-1: none) -> its output ``[B, D, T]``."""
    book = codebooks[0 if rvq.shared_codebook else level]
    rows = book[codes.clamp_min(0)].movedim(-1, 1)  # [B, d, T / stride]
    out = _project_out(rvq, level, rows.to(rvq.codebooks.dtype).contiguous())
    used = (codes >= 0)[:, None]
    stride = _stride(rvq, level)
    return torch.where(used.repeat_interleave(stride, -1) if stride > 1 else used, out, 0.0)


@torch.no_grad()
def decode(rvq, codes: torch.Tensor) -> torch.Tensor:
    """``ResidualVQ.decode_indices`` level by level: ``codes [B, n, T]`` -> ``[B, D, T]``."""
    codebooks = rvq._codebooks().detach().float()
    total = 0
    for level in range(codes.shape[1]):
        level_codes = codes[:, level, ::_stride(rvq, level)]
        total = total + _decoded_level(rvq, codebooks, level, level_codes).float()
    return total


@torch.no_grad()
def _kmeans(rvq, x, flat_mask, backend):
    """Level by level: k-means of what each level will quantize (its projected residual)."""
    centroids = torch.zeros_like(rvq.codebooks)
    sizes = torch.zeros(rvq.codebooks.shape[:2], device=x.device)
    residual = x
    for level in range(rvq.num_quantizers):
        z = _project_in(rvq, level, residual)
        rows = z.movedim(1, -1).reshape(-1, z.shape[1]).float()
        book = 0 if rvq.shared_codebook else level
        k = rvq.level_sizes[level] if rvq.level_sizes else rvq.num_embeddings
        if level == book:
            centroids[book, :k], sizes[book, :k] = rvq._level_kmeans(
                real_rows(rows, flat_mask), k, backend)
        level_codes = rvq._nearest_centroid(rows, centroids[book, :k], backend).view(
            x.shape[0], -1)
        if flat_mask is not None:
            level_codes = torch.where(flat_mask.view(x.shape[0], -1), level_codes, -1)
        residual = residual - _decoded_level(rvq, centroids, level, level_codes).to(x.dtype)
    centroids = without_real_rows_nan(centroids, flat_mask)
    adopt_kmeans(rvq, rvq.codebooks, centroids, sizes)
