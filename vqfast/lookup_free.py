"""Lookup-free quantizers: ``FSQ`` (Mentzer et al., 2023) and ``LFQ`` (MAGVIT-2, Yu et al., 2023)."""

import math
import warnings

import torch
from torch import nn

from . import functional as VF
from .ops import fsq as fsq_ops
from .modules import (LossBreakdown, Projection, QuantizerCommon, _is_int, check_codes, check_count,
                      check_number, keep_fp32)
from .ops import lfq as lfq_ops

# Beyond this many channels LFQ's exact codebook entropy (all 2**dim codes per vector) costs
# more than a step of most models: the constructor warns.
LFQ_EXPENSIVE_DIM = 18


# FSQ's bound reaches ``(1 + 1e-3) * (L - 1) / 2``: past L = 1001 it rounds to a value
# beyond the grid (codes outside [0, prod(levels))), so larger levels are refused.
FSQ_MAX_LEVEL = 1001


def check_levels(levels) -> list:
    """FSQ's ``levels`` as a list of ints in ``[2, FSQ_MAX_LEVEL]`` whose product fits the
    int64 codes."""
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__len__"):
        raise TypeError(f"levels must be a list of ints, e.g. [8, 5, 5, 5], got {levels!r}")
    levels = list(levels)
    if not levels or not all(_is_int(level) and 2 <= level <= FSQ_MAX_LEVEL for level in levels):
        raise ValueError(f"levels must be a non-empty list of ints in [2, {FSQ_MAX_LEVEL}] (FSQ's "
                         f"bound, (1 + 1e-3) * (L - 1) / 2, passes the grid above {FSQ_MAX_LEVEL}), "
                         f"got {levels}")
    levels = [int(level) for level in levels]
    if math.prod(levels) >= 2**62:
        raise ValueError(f"levels give {math.prod(levels)} codes; at most 2**62 fit the "
                         f"int64 codes")
    return levels


def unit_vectors(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``x / |x|`` along ``dim`` for every finite nonzero vector, whatever its norm (each
    vector first divided by its largest magnitude, constant for autograd: the direction is
    scale-free, so its value and gradient are exactly those of ``x / |x|``, without
    overflow above ~1.8e19 or a clamp below 1e-12); a zero vector stays 0 with gradient 0
    (``F.normalize`` passes ``1 / 1e-12`` there)."""
    peak = x.detach().abs().amax(dim, keepdim=True)
    scaled = x / torch.where(peak > 0, peak, 1.0)
    norm = torch.linalg.vector_norm(scaled, dim=dim, keepdim=True)
    return torch.where(norm > 0, scaled / torch.where(norm > 0, norm, 1.0), 0.0)


def check_lfq_options(*, entropy_loss_weight, commitment_cost, diversity_gamma, inv_temperature,
                      precision) -> None:
    """LFQ's (and ``ResidualLFQ``'s) loss options and precision, checked before anything is
    built."""
    check_number("entropy_loss_weight", entropy_loss_weight)
    check_number("commitment_cost", commitment_cost)
    check_number("diversity_gamma", diversity_gamma)
    check_number("inv_temperature", inv_temperature, above=True)
    if precision not in ("ieee", "tf32x3"):
        raise ValueError(f"precision must be 'ieee' or 'tf32x3', got {precision!r}")


class FSQ(QuantizerCommon, nn.Module):
    """Finite scalar quantization: each channel bounded with tanh and rounded to one of
    ``levels[i]`` values; no codebook, no auxiliary loss.

    Args:
        levels: values per channel, e.g. ``(8, 5, 5, 5)`` (1000 codes).
        dim: if given, inputs have ``dim`` channels: a learned linear projection maps them to
            ``len(levels)`` before quantizing and back after (as in the paper).
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.
        channel_last: ``z [B, *spatial, C]`` (tokens ``[B, N, C]``) in and out, codes ``[B,
            *spatial]``; read in place.

    ``forward(z, return_loss_breakdown=True)`` appends a ``vqfast.LossBreakdown`` of zeros
    (FSQ has no loss), for loops that log every quantizer alike.

    ``forward(z: [B, C, *spatial])`` (``C = dim or len(levels)``) returns ``(quantized,
    codes)``: ``quantized`` in z's shape and dtype, each channel on the grid
    ``(k - L//2) / (L//2)`` in ``[-1, 1]``, with the straight-through gradient of the bound;
    ``codes`` int64 ``[B, *spatial]``, mixed radix with the first channel least significant,
    in ``[0, prod(levels))``. ``decode_indices(codes)`` gives ``quantized`` back.
    """

    def __init__(self, levels, *, dim=None, backend="auto", channel_last=False):
        super().__init__()
        self.channel_last = bool(channel_last)
        levels = check_levels(levels)
        check_count("dim", dim)
        VF.check_backend(backend)
        self.levels = levels
        self.codebook_size = math.prod(levels)
        self.dim = dim or len(levels)
        self.backend = backend
        params, basis = fsq_ops.fsq_params(levels)
        self.register_buffer("params", params, persistent=False)
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("level_counts", torch.tensor(levels), persistent=False)
        projected = dim is not None and dim != len(levels)
        # the VQ modules' channels-first projections (in the input's dtype: a .half() FSQ
        # takes fp32 inputs)
        self.project_in = Projection(self.dim, len(levels)) if projected else None
        self.project_out = Projection(len(levels), self.dim) if projected else None

    def extra_repr(self):
        return f"levels={self.levels}, dim={self.dim}, codebook_size={self.codebook_size}"

    def _state_options(self):
        return {"levels": self.levels, "dim": self.dim}

    def _apply(self, fn, recurse=True):  # the grid's constants stay exact (fp32, int64)
        return keep_fp32(self, ("params",), fn, recurse)

    def forward(self, z, return_loss_breakdown=False):
        x = self._vectors_of("z", z, self.dim)
        if self.project_in is not None:
            x = self.project_in(x).contiguous()
        backend = VF.resolve_backend(self.backend, x.device)
        quantized, codes = fsq_ops.fsq(x, self.params, self.basis, backend)
        self._watch_codes(codes.view(1, -1), self.codebook_size)
        if self.project_out is not None:
            quantized = self.project_out(quantized)
        outputs = quantized.reshape(z.shape), codes.view(self._positions(z))
        if return_loss_breakdown:  # FSQ has no loss: every term is 0
            return (*outputs, LossBreakdown.of(quantized))
        return outputs

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Codes only: int64 ``[B, *spatial]`` (no autograd); ``decode_indices(encode(z))``
        equals the output."""
        return self.forward(z)[1]

    @torch.no_grad()
    def decode_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 ``codes [B, *spatial]`` in ``[0, prod(levels))`` -> ``quantized [B, C,
        *spatial]`` (fp32); -1 (the code of an input with NaN) decodes to NaN. Other values
        raise ``ValueError``."""
        check_codes(codes, self.codebook_size)
        codes = codes.long()
        per_channel = (1, -1, *[1] * (codes.dim() - 1))  # broadcast over [B, C, *spatial]
        levels = self.level_counts.view(per_channel)
        digits = (codes.unsqueeze(1) // self.basis.view(per_channel)) % levels
        half_width = levels // 2
        quantized = (digits - half_width).float() / half_width
        quantized = torch.where(codes.unsqueeze(1) >= 0, quantized, float("nan"))
        if self.project_out is not None:
            quantized = self.project_out(quantized.flatten(2)).view(
                codes.shape[0], self.dim, *codes.shape[1:])
        return self._channels_first_in_layout(quantized)


class LFQ(QuantizerCommon, nn.Module):
    """Lookup-free quantization: ``quantized = sign(z)``, ``2**dim`` implicit codes, and the
    entropy loss of MAGVIT-2 computed exactly over all of them.

    Args:
        dim: d, the channels of the input (and bits of a code); at most 24.
        entropy_loss_weight, commitment_cost, diversity_gamma, inv_temperature: the loss
            ``entropy_loss_weight * (mean_x H(p(.|x)) - diversity_gamma * H(mean_x p(.|x)))
            + commitment_cost * mse(z, sign(z))`` with ``p(c|x) = softmax_c(2 *
            inv_temperature * <x, c>)`` over the codes ``c`` in ``{-1, 1}^d``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``; precision: the Triton dot precision
            for fp32 inputs (``"ieee"`` default, ``"tf32x3"``; ``"tf32"`` would round the logits).
        channel_last: ``z [B, *spatial, dim]`` (tokens ``[B, N, dim]``) in and out, codes
            ``[B, *spatial]``; read in place.
        spherical: binary spherical quantization (BSQ, Zhao et al. 2024): each vector is
            l2-normalised, ``u = z / |z|``, and quantized to ``sign(u) / sqrt(d)`` on the unit
            sphere; the codes ``c`` are ``{-1, 1}^d / sqrt(d)``, ``p(c|u) = softmax_c(2 *
            inv_temperature * <u, c>)``, the commitment ``mse(u, q)``, and the codebook
            entropy is exact over all ``2**d`` codes (not the paper's group-factorised
            approximation, ``vqfast.reference.bsq_grouped_codebook_entropy``). The gradient
            flows through the normalisation (straight-through on ``u``); ``u`` is exactly
            ``z / |z|`` at any finite nonzero norm (``unit_vectors``), and a zero vector has
            ``u = 0`` and gradient 0.

    ``forward(z, return_loss_breakdown=True)`` appends a ``vqfast.LossBreakdown``:
    ``commitment``, ``entropy`` (the weighted per-sample entropy) and ``diversity`` (minus
    the weighted ``diversity_gamma`` times the codebook entropy), summing to ``loss``.

    ``forward(z: [B, dim, *spatial])`` returns ``(loss, quantized, perplexity, codes)``:
    ``quantized`` = +1 where ``z > 0`` else -1, in z's dtype, with a straight-through
    gradient; ``codes`` int64 ``[B, *spatial]``, ``sum_i [z_i > 0] 2**(dim-1-i)`` (the first
    channel most significant); ``perplexity`` from the code counts. The per-sample entropy
    uses its closed form (p factorises over channels); the codebook entropy and its
    gradient stream all ``2**dim`` codes (memory ``[2**dim]``, never ``[N, 2**dim]``).
    """

    def __init__(self, dim, *, entropy_loss_weight=0.1, commitment_cost=0.25, diversity_gamma=1.0,
                 inv_temperature=100.0, backend="auto", precision="ieee", channel_last=False,
                 spherical=False):
        super().__init__()
        self.channel_last = bool(channel_last)
        self.spherical = bool(spherical)
        if not (_is_int(dim) and 1 <= dim <= 24):
            raise ValueError(f"dim must be an int in [1, 24] (2**dim codes), got {dim!r}")
        if dim > LFQ_EXPENSIVE_DIM and entropy_loss_weight and diversity_gamma:
            warnings.warn(f"LFQ(dim={dim}): the exact codebook entropy sums over all 2**{dim} "
                          f"codes for every vector (about N * 2**{dim} multiply-adds a step, "
                          f"and [2**{dim}] floats); diversity_gamma=0 skips it", stacklevel=2)
        VF.check_backend(backend)
        check_lfq_options(entropy_loss_weight=entropy_loss_weight, commitment_cost=commitment_cost,
                          diversity_gamma=diversity_gamma, inv_temperature=inv_temperature,
                          precision=precision)
        self.dim, self.codebook_size = dim, 2**dim
        self.entropy_loss_weight, self.commitment_cost = entropy_loss_weight, commitment_cost
        self.diversity_gamma, self.inv_temperature = diversity_gamma, inv_temperature
        self.backend, self.precision = backend, precision
        self.register_buffer("bits", 2 ** torch.arange(dim - 1, -1, -1), persistent=False)

    def extra_repr(self):
        return (f"dim={self.dim}, entropy_loss_weight={self.entropy_loss_weight}, "
                f"commitment_cost={self.commitment_cost}, inv_temperature={self.inv_temperature}"
                + (", spherical=True" if self.spherical else ""))

    def _state_options(self):
        return {"dim": self.dim}

    @property
    def _code_scale(self) -> float:
        """A code's value per channel: 1, or ``1/sqrt(d)`` on the unit sphere (BSQ)."""
        return 1.0 / math.sqrt(self.dim) if self.spherical else 1.0

    def forward(self, z, return_loss_breakdown=False):
        x3 = self._quantized_vectors(z)
        backend = VF.resolve_backend(self.backend, z.device)
        scale = self._code_scale
        # One pass: the codes (exactly ±scale; the identity's gradient backward), their
        # indices and counts, the commitment and the per-sample entropy (closed form)
        quantized, commitment, entropy, codes, counts = lfq_ops.lfq_quantize(
            x3, scale, self.commitment_cost, self.entropy_loss_weight, self.inv_temperature,
            backend)
        self._watch_usage(counts)
        loss, diversity = commitment, None
        if not self.entropy_loss_weight:
            entropy = None
        else:
            loss = loss + entropy
            if self.diversity_gamma:
                # <x, c> with c = s * scale, s in {-1, 1}^d: the ±1 entropies of x * scale
                rows = x3.movedim(1, -1).reshape(-1, self.dim) * scale
                diversity = -self.entropy_loss_weight * self.diversity_gamma * \
                    lfq_ops.codebook_entropy(rows, self.inv_temperature, backend, self.precision)
                loss = loss + diversity
        outputs = (loss, quantized.reshape(z.shape).to(z.dtype), VF.perplexity(counts, backend),
                   codes.view(self._positions(z)))
        if return_loss_breakdown:
            return (*outputs, LossBreakdown.of(loss, commitment=commitment, entropy=entropy,
                                               diversity=diversity))
        return outputs

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Codes only: int64 ``[B, *spatial]``, ``sum_i [z_i > 0] 2**(dim-1-i)`` (of ``u =
        z / |z|`` in fp32 when ``spherical``, as the forward), without the entropy terms (no
        work over the ``2**dim`` codes)."""
        return self._codes(self._quantized_vectors(z) > 0).view(self._positions(z))

    def _quantized_vectors(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` validated as ``[B, dim, S]``: the vectors whose signs are the codes (on the
        unit sphere, fp32, when ``spherical``: ``u`` has z's signs wherever a channel's share
        of its vector's norm stays within fp32's range, as the oracle's)."""
        x3 = self._vectors_of("z", z, self.dim)
        return unit_vectors(x3.float()) if self.spherical else x3

    def _codes(self, positive: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` codes of ``positive = z > 0`` (bool ``[B, dim, S]``), first channel
        most significant."""
        return (positive.long() * self.bits.view(1, -1, 1)).sum(1)

    @torch.no_grad()
    def decode_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 ``codes [B, *spatial]`` in ``[0, 2**dim)`` -> ``quantized [B, dim, *spatial]``
        (fp32, ±1). Other values raise ``ValueError``."""
        check_codes(codes, self.codebook_size, dropped_ok=False)
        codes = codes.long()
        bits = self.bits.view(1, -1, *[1] * (codes.dim() - 1))
        scale = self._code_scale
        return self._channels_first_in_layout(
            (((codes.unsqueeze(1) // bits) % 2).float() * 2 - 1) * scale)
