"""Residual lookup-free quantizers: ``ResidualFSQ`` and ``ResidualLFQ``, optionally grouped,
with quantize dropout; every level of every group in one fused launch."""

import math
import warnings

import torch
from torch import nn

from . import functional as VF
from .lookup_free import LFQ_EXPENSIVE_DIM, check_levels, check_lfq_options
from .modules import (LossBreakdown, Projection, QuantizerCommon, _is_int, check_codes, check_count,
                      keep_fp32)
from .ops import fsq as fsq_ops
from .ops import lfq as lfq_ops
from .ops import residual_scalar as ops
from .ops.residual_vq import _level_perplexity_op
from .reference import residual_fsq_scales


class _ResidualScalar(QuantizerCommon, nn.Module):
    """What the two residual lookup-free quantizers share: the group layout, the projections,
    quantize dropout and the codes' layout."""

    def _setup(self, dim, width, num_quantizers, groups, quantize_dropout, backend, channel_last):
        check_count("num_quantizers", num_quantizers)
        check_count("groups", groups)
        check_count("dim", dim)
        VF.check_backend(backend)
        self.channel_last = bool(channel_last)
        self.num_quantizers, self.groups = num_quantizers, groups
        self.quantize_dropout = bool(quantize_dropout)
        self.backend = backend
        self.dim = dim or width
        projected = self.dim != width
        self.project_in = Projection(self.dim, width) if projected else None
        self.project_out = Projection(width, self.dim) if projected else None
        self.register_buffer("all_levels", torch.tensor(num_quantizers), persistent=False)

    def _inputs(self, z):
        """Validated ``z`` as ``[B, G*C, S]`` (projected), and its backend."""
        x = self._vectors_of("z", z, self.dim)
        if self.project_in is not None:
            x = self.project_in(x).contiguous()
        return x, VF.resolve_backend(self.backend, x.device)

    def _levels(self, num_levels, training: bool = True):
        """``(n, scales [n, C], active)`` of a forward (``training``) or encode over each
        group's first ``n = num_levels`` levels (default all Q; levels past n are not
        run). ``active``: the levels that run, an int64 0-d tensor: n, or in training with
        ``quantize_dropout`` uniform in 1..n, drawn on the device (no host sync)."""
        n = self.num_quantizers
        if num_levels is not None:
            if not (_is_int(num_levels) and 1 <= num_levels <= self.num_quantizers):
                raise ValueError(f"num_levels must be an int in [1, {self.num_quantizers}] "
                                 f"(num_quantizers), got {num_levels!r}")
            n = int(num_levels)
        device = self.all_levels.device
        if training and self.training and self.quantize_dropout and torch.is_grad_enabled():
            active = torch.randint(1, n + 1, (), device=device)
        else:
            active = self.all_levels if n == self.num_quantizers else torch.full(
                (), n, dtype=torch.int64, device=device)
        return n, self.scales[:n], active

    def _watch_levels(self, codes: torch.Tensor, n: int) -> None:
        """The collapse watch of each group's first level (never dropped), codes ``[G*n, N]``."""
        self._watch_codes(codes.view(self.groups, n, -1)[:, 0], self.codebook_size)

    def _output(self, quantized, z):
        if self.project_out is not None:
            quantized = self.project_out(quantized)
        return quantized.reshape(z.shape)

    @torch.no_grad()
    def decode_indices(self, codes: torch.Tensor, *, levels_dim=None) -> torch.Tensor:
        """int64 ``codes [B, G*n, *spatial]`` (the first ``n <= Q`` levels of each group, in
        ``[0, codebook_size)``, -1 = not quantized) -> ``quantized [B, D, *spatial]`` fp32:
        the sum of those levels' values. Other values raise ``ValueError``. ``levels_dim``:
        as for ``ResidualVQ.decode_indices`` (ambiguous shapes are refused, not guessed)."""
        check_codes(codes, self.codebook_size)
        flat, spatial = self._level_codes(codes.long(), self.groups, self.num_quantizers,
                                          levels_dim)
        flat = flat[..., None]  # [B, G, n, S, 1]
        values = self._level_values(flat.clamp_min(0)) * self.scales[:flat.shape[2], None, :]
        per_level = torch.where(flat >= 0, values, 0.0)  # [B, G, n, S, C]
        b, g, _, s, c = per_level.shape
        total = per_level.sum(2).permute(0, 1, 3, 2).reshape(b, g * c, s)
        if self.project_out is not None:
            total = self.project_out(total)
        return self._channels_first_in_layout(total.reshape(b, -1, *spatial))


class ResidualFSQ(_ResidualScalar):
    """Residual finite scalar quantization (as in the FSQ paper's and vector-quantize-pytorch's
    ``ResidualFSQ``), optionally grouped: level ``l`` quantizes the residual ``r_l = z -
    (q_0 + ... + q_{l-1})`` with FSQ at scale ``s_l = (2 * (L // 2)) ** -l`` per channel,
    ``q_l = s_l * fsq(r_l / s_l)``, so each level refines the last one's rounding step.

    Args:
        levels: FSQ values per channel, e.g. ``(8, 5, 5, 5)``; each level has
            ``prod(levels)`` codes.
        num_quantizers: Q, the levels (per group).
        dim: if given, inputs have ``dim`` channels: a learned linear projection maps them to
            ``G * len(levels)`` before quantizing and back after.
        groups: G; group ``g`` quantizes channels ``g*C .. (g+1)*C`` (``C = len(levels)``)
            with its own Q levels.
        quantize_dropout: in training, each batch runs the first n levels, n uniform in
            1..Q (SoundStream); the dropped levels get code -1.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.
        channel_last: ``z [B, *spatial, D]`` (tokens ``[B, N, D]``) in and out, codes
            ``[B, *spatial, G*Q]``; read in place.

    ``forward(z: [B, D, *spatial])`` (``D = dim or G * len(levels)``) returns ``(quantized,
    codes)``: ``quantized`` in z's shape and dtype, the sum of the levels, with the gradient
    of every level's bound (straight through the rounding, as FSQ); ``codes`` int64 ``[B,
    G*Q, *spatial]`` (level ``l`` of group ``g`` at ``g*Q + l``), each FSQ's mixed radix
    code in ``[0, prod(levels))``, -1 for a dropped level or an input with NaN. One fused
    launch each way for all levels and groups. ``return_loss_breakdown=True`` appends a
    ``vqfast.LossBreakdown`` of zeros (no loss). ``decode_indices(codes)`` sums the levels'
    values back.
    """

    def __init__(self, levels, num_quantizers, *, dim=None, groups=1, quantize_dropout=False,
                 backend="auto", channel_last=False):
        super().__init__()
        self.levels = check_levels(levels)
        self._setup(dim, groups * len(self.levels), num_quantizers, groups, quantize_dropout,
                    backend, channel_last)
        self.codebook_size = math.prod(self.levels)
        if self.codebook_size >= 2**53:
            raise ValueError(f"levels give {self.codebook_size} codes per level; ResidualFSQ "
                             f"takes at most 2**53")
        params, basis = fsq_ops.fsq_params(self.levels)
        self.register_buffer("params", params, persistent=False)
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("scales", residual_fsq_scales(self.levels, num_quantizers),
                             persistent=False)
        self.register_buffer("level_counts", torch.tensor(self.levels), persistent=False)

    def extra_repr(self):
        return (f"levels={self.levels}, num_quantizers={self.num_quantizers}, "
                f"groups={self.groups}, dim={self.dim}")

    def _state_options(self):
        return {"levels": self.levels, "num_quantizers": self.num_quantizers,
                "groups": self.groups, "dim": self.dim}

    def _apply(self, fn, recurse=True):  # the grid's constants stay exact (fp32, int64)
        return keep_fp32(self, ("params", "scales"), fn, recurse)

    def forward(self, z, return_loss_breakdown=False, *, num_levels=None):
        n, scales, active = self._levels(num_levels)
        x, backend = self._inputs(z)
        quantized, codes = ops.residual_fsq(x, self.params, self.basis, scales, active,
                                            self.groups, backend)
        self._watch_levels(codes, n)
        outputs = self._output(quantized, z), self._codes_in_layout(codes, z)
        if return_loss_breakdown:  # no loss: every term is 0
            return (*outputs, LossBreakdown.of(quantized))
        return outputs

    @torch.no_grad()
    def encode(self, z: torch.Tensor, *, num_levels=None) -> torch.Tensor:
        """Codes only, of each group's first ``num_levels`` levels (default all): int64
        ``[B, G*n, *spatial]``; ``decode_indices(encode(z))`` equals the eval-mode output."""
        _, scales, active = self._levels(num_levels, training=False)
        x, backend = self._inputs(z)
        codes = ops.residual_fsq(x, self.params, self.basis, scales, active, self.groups,
                                 backend)[1]
        return self._codes_in_layout(codes, z)

    def _level_values(self, codes: torch.Tensor) -> torch.Tensor:
        """A level's grid values ``[..., C]`` of its codes ``[..., 1]`` (before its scale)."""
        digits = (codes // self.basis) % self.level_counts
        half_width = self.level_counts // 2
        return (digits - half_width).float() / half_width


class ResidualLFQ(_ResidualScalar):
    """Residual lookup-free quantization (vector-quantize-pytorch's ``ResidualLFQ``),
    optionally grouped: level ``l`` quantizes the residual ``r_l = z - (q_0 + ... +
    q_{l-1})`` to ``q_l = sign(r_l) * 2**-l``, with LFQ's entropy loss over its ``2**d``
    scaled codes computed exactly (streamed, never ``[N, 2**d]``).

    Args:
        dim: D, the input channels.
        num_quantizers: Q, the levels (per group).
        codebook_dim: d, bits per level and group: learned projections ``D -> G * d`` before
            quantizing and back after; default ``D / G`` (no projection). At most 24.
        groups: G; group ``g`` quantizes channels ``g*d .. (g+1)*d`` with its own levels.
        entropy_loss_weight, commitment_cost, diversity_gamma, inv_temperature: as for
            ``LFQ``, per level, with ``p(c|r_l) = softmax_c(2 * inv_temperature * <r_l,
            c>)`` over the level's codes ``c in {-1, 1}^d * 2**-l``.
        quantize_dropout: in training, each batch runs the first n levels, n uniform in
            1..Q; dropped levels get code -1 and add no loss.
        backend, precision: as for ``LFQ``.
        channel_last: ``z [B, *spatial, D]`` in and out, codes ``[B, *spatial, G*Q]``.

    ``forward(z: [B, D, *spatial])`` returns ``(loss, quantized, perplexity, codes)``:
    ``loss = sum_l [mean_g entropy_loss_weight * (H_sample - diversity_gamma * H_codebook)
    + commitment_cost * sum_g |r_l - q_l|^2 / (N * G*d)]`` (``vqfast.reference.residual_lfq``);
    ``quantized`` in z's shape and dtype, the sum of the levels, with the identity's
    gradient (straight-through on the sum, as ``ResidualVQ``); ``perplexity`` fp32
    ``[G*Q]``; ``codes`` int64 ``[B, G*Q, *spatial]``, each level's LFQ code (first channel
    most significant). The levels run in one fused launch; the codebook entropy streams
    each level's codes. ``return_loss_breakdown=True`` appends a ``vqfast.LossBreakdown``
    (commitment, entropy, diversity, summed over the levels).
    """

    def __init__(self, dim, num_quantizers, *, codebook_dim=None, groups=1,
                 entropy_loss_weight=0.1, commitment_cost=0.25, diversity_gamma=1.0,
                 inv_temperature=100.0, quantize_dropout=False, backend="auto",
                 precision="ieee", channel_last=False):
        super().__init__()
        check_count("dim", dim)
        check_count("codebook_dim", codebook_dim)
        check_count("groups", groups)
        if codebook_dim is None and dim % groups:
            raise ValueError(f"dim={dim} is not divisible by groups={groups}")
        bits = codebook_dim or dim // groups
        if not 1 <= bits <= 24:
            raise ValueError(f"bits per level (codebook_dim, or dim / groups) must be in [1, 24] "
                             f"(2**bits codes), got {bits}")
        check_lfq_options(entropy_loss_weight=entropy_loss_weight, commitment_cost=commitment_cost,
                          diversity_gamma=diversity_gamma, inv_temperature=inv_temperature,
                          precision=precision)
        if bits > LFQ_EXPENSIVE_DIM and entropy_loss_weight and diversity_gamma:
            warnings.warn(f"ResidualLFQ with {bits} bits per level: the exact codebook entropy "
                          f"sums over all 2**{bits} codes for every vector and level; "
                          f"diversity_gamma=0 skips it", stacklevel=2)
        self._setup(dim, groups * bits, num_quantizers, groups, quantize_dropout, backend,
                    channel_last)
        self.code_dim = bits
        self.codebook_size = 2**bits
        self.entropy_loss_weight, self.commitment_cost = entropy_loss_weight, commitment_cost
        self.diversity_gamma, self.inv_temperature = diversity_gamma, inv_temperature
        self.precision = precision
        self.register_buffer("bits", 2 ** torch.arange(bits - 1, -1, -1), persistent=False)
        level_scales = 2.0 ** -torch.arange(num_quantizers, dtype=torch.float64)
        self.register_buffer("scales", level_scales[:, None].expand(-1, bits).float().contiguous(),
                             persistent=False)

    def extra_repr(self):
        return (f"dim={self.dim}, num_quantizers={self.num_quantizers}, groups={self.groups}, "
                f"code_dim={self.code_dim}, entropy_loss_weight={self.entropy_loss_weight}, "
                f"commitment_cost={self.commitment_cost}")

    def _state_options(self):
        return {"dim": self.dim, "num_quantizers": self.num_quantizers, "groups": self.groups,
                "codebook_dim": self.code_dim}

    def _apply(self, fn, recurse=True):
        return keep_fp32(self, ("scales",), fn, recurse)

    def forward(self, z, return_loss_breakdown=False, *, num_levels=None):
        q, scales, active = self._levels(num_levels)
        x, backend = self._inputs(z)
        g, d = self.groups, self.code_dim
        total, codes, residuals = ops.residual_sign_levels(x, self.bits, scales, active,
                                                           g, True, backend)
        self._watch_levels(codes, q)
        # each level's input with the identity's gradient to x: r_l = x_g - sg(q_0 + ...)
        x_rows = x.movedim(1, -1).reshape(-1, g, d).transpose(0, 1).float()  # [G, N, d]
        x_rows = x_rows.repeat_interleave(q, 0)  # [G*Q, N, d]
        rows = x_rows + (residuals - x_rows).detach()
        on = (torch.arange(q, device=x.device) < active).repeat(g).float()  # [G*Q]
        scale = scales[:, 0].repeat(g)  # [G*Q]
        weight = self.entropy_loss_weight / g
        # every level's commitment and per-sample entropy in one pass (codes ±scale[l])
        commitment, entropy = lfq_ops.lfq_terms(rows, scale, on, self.commitment_cost / g,
                                                weight, self.inv_temperature, backend)
        loss, diversity = commitment, None
        if not self.entropy_loss_weight:
            entropy = None
        else:
            loss = loss + entropy
            if self.diversity_gamma:
                # <r, c * s> = <r * s, c>: the ±1 entropies of r * s
                scaled = rows * scale[:, None, None]
                # every level's codebook entropy at once (a slot each: one launch each way)
                book = lfq_ops.codebook_entropy(scaled, self.inv_temperature, backend,
                                                self.precision, batched=True)
                diversity = -weight * self.diversity_gamma * (book * on).sum()
                loss = loss + diversity
        # the sum of the levels forward, the identity's gradient backward
        quantized = total + (x - x.detach())
        outputs = (loss, self._output(quantized, z), self._perplexity(codes, backend),
                   self._codes_in_layout(codes, z))
        if return_loss_breakdown:
            return (*outputs, LossBreakdown.of(loss, commitment=commitment, entropy=entropy,
                                               diversity=diversity))
        return outputs

    def _perplexity(self, codes: torch.Tensor, backend: str) -> torch.Tensor:
        """Per level ``[G*Q]``, from the code counts (1 for a dropped level): one launch on
        the Triton backend (the residual quantizers' per-level perplexity)."""
        counts = torch.zeros(codes.shape[0], self.codebook_size, dtype=torch.int32,
                             device=codes.device).scatter_add_(1, codes.clamp_min(0),
                                                               (codes >= 0).int())
        return _level_perplexity_op(counts, backend)

    @torch.no_grad()
    def encode(self, z: torch.Tensor, *, num_levels=None) -> torch.Tensor:
        """Codes only, of each group's first ``num_levels`` levels (default all): int64
        ``[B, G*n, *spatial]``, without the entropy terms (no work over the ``2**d`` codes)."""
        _, scales, active = self._levels(num_levels, training=False)
        x, backend = self._inputs(z)
        codes = ops.residual_sign_levels(x, self.bits, scales, active, self.groups, False,
                                         backend)[1]
        return self._codes_in_layout(codes, z)

    def _level_values(self, codes: torch.Tensor) -> torch.Tensor:
        """A level's signs ``[..., d]`` of its codes ``[..., 1]`` (before its scale ``2**-l``)."""
        return ((codes // self.bits) % 2).float() * 2 - 1
