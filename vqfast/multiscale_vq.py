"""``MultiScaleResidualVQ``: VAR's multi-scale residual quantizer (Tian et al., 2024), one
codebook shared by the scales, each scale's nearest-code search on the fused path."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import functional as VF
from . import quantizer_base
from .codebook_upkeep import register_codebook_state, register_reseed_key
from .ops.vq import _quantize_op
from .modules import (LossBreakdown, QuantizerCommon, _all_reduce_statistics, _is_int,
                      adopt_kmeans, check_codebook_options, check_codes, check_count, check_number,
                      keep_fp32, kmeans, reseed_dead_codes)

UPSAMPLING = ("bicubic", "bilinear", "nearest")


class Phi(nn.Conv2d):
    """VAR's ``quant_resi`` refinement of an upsampled scale: ``h * (1 - ratio) +
    conv3x3(h) * ratio`` (``ratio = 0``: the identity)."""

    def __init__(self, dim: int, ratio: float):
        super().__init__(dim, dim, kernel_size=3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h):
        if self.ratio == 0:
            return h
        # in h's dtype (fp32: the EMA codebook stays fp32 when the module is cast to half)
        conv = self._conv_forward(h, self.weight.to(h.dtype), self.bias.to(h.dtype))
        return h * (1 - self.ratio) + conv * self.ratio


def phi_ticks(count: int) -> np.ndarray:
    """Where VAR places ``count`` shared ``Phi`` s on ``[0, 1]`` (scale ``s`` of ``S`` takes
    the one nearest ``s / (S - 1)``)."""
    if count == 4:
        return np.linspace(1 / 3 / count, 1 - 1 / 3 / count, count)
    return np.linspace(1 / 2 / count, 1 - 1 / 2 / count, count)


class MultiScaleResidualVQ(QuantizerCommon, nn.Module):
    """Multi-scale residual VQ of VAR (Tian et al., 2024, "Visual Autoregressive Modeling"),
    for feature maps ``[B, D, H, W]``.

    Scale ``s`` (coarse to fine) area-downsamples the residual ``f_rest`` to ``h_s x w_s``,
    takes each position's nearest code (one codebook shared by all scales; the fused
    search, never ``[N, K]``), upsamples the codes back to ``H x W`` (``upsample``), refines
    them with a shared 3x3 conv ``Phi`` (``quant_resi``) and adds them to ``f_hat``
    (subtracting them from ``f_rest``). A scale of the input's size is not resampled.

    Args:
        num_embeddings: K, codes (VAR: 4096).
        embedding_dim: D, the input channels (VAR: 32).
        scales: sizes coarse to fine, ints (square) or ``(h, w)`` pairs, at most
            ``input_size`` (VAR's ``patch_nums``, for 16 x 16 latents).
        commitment_cost: beta. ``loss = mean_s [beta * mse(sg(f_hat_s), f) + mse(f_hat_s,
            sg(f))]`` over the running sums ``f_hat_s`` (VAR's): the second term trains the
            codebook (learned) and the ``Phi`` convs.
        decay, epsilon: the EMA decay and Laplace smoothing (``ema=True``).
        ema: EMA codebook (the default: buffers, one update per step from every scale's
            statistics, with dead-code re-seeding) or a learned one (``ema=False``: VAR's,
            an ``nn.Parameter``; in the README's quality run it used 53-320 of 512 codes
            where the EMA one used all, at a higher test error).
        quant_resi: the ``Phi`` ratio (VAR: 0.5; 0 = no conv).
        share_quant_resi: how many ``Phi`` s the scales share (VAR: 4); 0 = one per scale.
        upsample: ``"bicubic"`` (VAR), ``"bilinear"`` or ``"nearest"``.
        kmeans_init, kmeans_iters: the codebook from k-means of the first training batch's
            vectors (on by default).
        dead_code_threshold: ``ema=True`` only: re-seed codes whose bias-corrected EMA size
            falls below it from the finest scale's residuals (default 0.5 with ``ema``, else 0).
        sync_distributed: all-reduce the EMA statistics over ranks (default: when initialised).
        backend, precision: as for ``VectorQuantizer``.
        channel_last: ``[B, H, W, D]`` in and out.
        input_size: ``(H, W)`` (or an int, square) of the feature maps the module takes;
            default the finest scale's size (VAR's). Inputs of another size are refused, so
            the codes alone say what ``decode_indices`` rebuilds: ``f_hat`` at this size.

    ``forward(f: [B, D, H, W], mask=None, return_loss_breakdown=False)`` (the argument order
    of the other quantizers) returns ``(loss, quantized, perplexity, codes)``:
    ``quantized`` = ``f_hat`` forward, the identity's gradient to ``f`` (VAR's
    straight-through), in f's dtype; ``perplexity`` of every scale's codes together;
    ``codes`` int64 ``[B, L]``, ``L = sum_s h_s * w_s``: each scale's codes row-major, coarse
    to fine (VAR's token sequence). ``decode_indices(codes)`` rebuilds ``f_hat`` at
    ``input_size``: ``decode_indices(encode(f))`` equals the eval-mode output;
    ``codes_per_scale(codes)`` splits them into ``[B, h_s, w_s]``. ``mask`` must be
    ``None``: each scale averages neighbouring positions, so no position can be left out
    (a mask raises ``ValueError`` before any state changes).
    """

    def __init__(self, num_embeddings, embedding_dim, scales=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                 commitment_cost=0.25, decay=0.99, epsilon=1e-5, *, ema=True, quant_resi=0.5,
                 share_quant_resi=4, upsample="bicubic", kmeans_init=True, kmeans_iters=10,
                 dead_code_threshold=None, sync_distributed=None, backend="auto",
                 precision="ieee", channel_last=False, input_size=None):
        super().__init__()
        check_count("num_embeddings", num_embeddings)
        check_count("embedding_dim", embedding_dim)
        check_count("share_quant_resi", share_quant_resi, low=0)
        check_number("commitment_cost", commitment_cost)
        check_number("quant_resi", quant_resi, -1.0, high=1.0)  # (VAR takes its magnitude)
        self.scales = self._check_scales(scales)
        self.input_size = self.scales[-1] if input_size is None else \
            self._check_scales([input_size], "input_size")[0]
        if any(sh > self.input_size[0] or sw > self.input_size[1] for sh, sw in self.scales):
            raise ValueError(f"scales {self.scales} must not exceed input_size "
                             f"{self.input_size}")
        if upsample not in UPSAMPLING:
            raise ValueError(f"upsample must be one of {UPSAMPLING}, got {upsample!r}")
        dead_code_threshold = check_codebook_options(
            ema=ema, decay=decay, epsilon=epsilon, dead_code_threshold=dead_code_threshold,
            default_threshold=0.5 if ema else 0.0, precision=precision, backend=backend)
        self.channel_last = bool(channel_last)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.commitment_cost, self.decay, self.epsilon = commitment_cost, decay, epsilon
        self.ema, self.upsample = ema, upsample
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.dead_code_threshold, self.sync_distributed = dead_code_threshold, sync_distributed
        self.backend, self.precision = backend, precision
        count = share_quant_resi or len(self.scales)
        self.share_quant_resi = share_quant_resi
        self.quant_resi = nn.ModuleList(Phi(embedding_dim, quant_resi) for _ in range(count))
        ticks = phi_ticks(count)
        last = max(len(self.scales) - 1, 1)
        self._phi_of_scale = [int(np.argmin(np.abs(ticks - s / last)))
                              for s in range(len(self.scales))]
        codebook = torch.empty(num_embeddings, embedding_dim).uniform_(
            -1 / num_embeddings, 1 / num_embeddings)  # VAR's init
        register_codebook_state(self, "codebook", codebook, ema, kmeans_init)
        if ema:
            register_reseed_key(self)

    @staticmethod
    def _check_scales(scales, name="scales"):
        if isinstance(scales, (str, bytes)) or not hasattr(scales, "__len__") or not scales:
            raise ValueError(f"{name} must be a non-empty sequence of sizes, got {scales!r}")
        sizes = []
        for s in scales:
            pair = (s, s) if _is_int(s) else tuple(s) if hasattr(s, "__len__") else None
            if pair is None or len(pair) != 2 or not all(_is_int(v) and v >= 1 for v in pair):
                raise ValueError(f"each of {name} must be an int >= 1 or an (h, w) pair, got "
                                 f"{s!r}")
            sizes.append((int(pair[0]), int(pair[1])))
        return sizes

    def extra_repr(self):
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"scales={self.scales}, ema={self.ema}, upsample={self.upsample!r}")

    def _state_options(self):
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "scales": [list(s) for s in self.scales], "ema": self.ema,
                "share_quant_resi": self.share_quant_resi}

    def _apply(self, fn, recurse=True):
        state = ("codebook", "ema_cluster_size", "ema_weight", "ema_decay_weight")
        return keep_fp32(self, state if self.ema else (), fn, recurse)

    @property
    def sequence_length(self) -> int:
        """L, the codes per image: ``sum_s h_s * w_s``."""
        return sum(h * w for h, w in self.scales)

    def _features(self, inputs, mask=None):
        """Validated ``[B, D, H, W]`` fp32 (channel-last inputs moved); ``mask`` refused."""
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
            layout = "[B, H, W, D]" if self.channel_last else "[B, D, H, W]"
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"inputs must be feature maps {layout}, got {shape}")
        self._vectors_of("inputs", inputs, self.embedding_dim)  # checks channels and dtype
        f = inputs.movedim(-1, 1) if self.channel_last else inputs
        h, w = f.shape[2:]
        if any(sh > h or sw > w for sh, sw in self.scales):
            raise ValueError(f"scales {self.scales} must not exceed the input's size {h} x {w}")
        if (h, w) != self.input_size:
            raise ValueError(f"inputs are {h} x {w} but the module was built for "
                             f"{self.input_size[0]} x {self.input_size[1]} (input_size, default "
                             f"the finest scale): build it with input_size=({h}, {w})")
        if mask is not None:
            raise ValueError("MultiScaleResidualVQ takes no mask: its scales average "
                             "neighbouring positions, so none can be left out (crop the "
                             "feature maps instead)")
        if f.device != self.codebook.device:
            raise ValueError(f"inputs are on {f.device} but the codebook is on "
                             f"{self.codebook.device}; move the module with .to(device)")
        return f.float()

    def _up(self, h, size):
        """A scale's codes ``[B, D, h_s, w_s]`` upsampled to ``size`` (as they are if already
        that size)."""
        if tuple(h.shape[2:]) == tuple(size):
            return h
        align = {} if self.upsample == "nearest" else {"align_corners": False}
        return F.interpolate(h, size=size, mode=self.upsample, **align)

    def forward(self, inputs, mask=None, return_loss_breakdown=False):
        f = self._features(inputs, mask)
        b, d, height, width = f.shape
        backend = VF.resolve_backend(self.backend, f.device)
        if self.training and not self._kmeans_done:
            self._kmeans(f, backend)
        update = self.ema and self.training
        codebook = self.codebook
        f_rest = f.detach()
        f_hat = torch.zeros_like(f)
        codes, commitment, codebook_term = [], 0.0, 0.0
        counts = code_sums = rows = None
        for s, size in enumerate(self.scales):
            rest = f_rest if size == (height, width) else F.interpolate(f_rest, size=size, mode="area")
            rest = rest.reshape(b, d, -1).contiguous()
            _, idx, _, _, n_s, sums_s, _ = _quantize_op(
                rest, codebook.detach().float(), update, 1.0, backend, self.precision)
            counts = n_s if counts is None else counts + n_s
            if update:
                code_sums = sums_s if code_sums is None else code_sums + sums_s
            codes.append(idx.view(b, -1))
            h = F.embedding(idx.view(b, *size), codebook).permute(0, 3, 1, 2)
            h = self.quant_resi[self._phi_of_scale[s]](self._up(h, (height, width)))
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            commitment = commitment + F.mse_loss(f_hat.detach(), f)
            codebook_term = codebook_term + F.mse_loss(f_hat, f.detach())
            rows = rest
        n = len(self.scales)
        commitment = self.commitment_cost * commitment / n
        codebook_term = codebook_term / n
        loss = commitment + codebook_term
        if update:
            self._update(counts, code_sums, loss.detach(), rows, backend)
        self._watch_usage(counts)
        quantized = f + (f_hat - f).detach()  # VAR's straight-through
        if self.channel_last:
            quantized = quantized.movedim(1, -1)
        outputs = (loss, quantized.to(inputs.dtype), VF.perplexity(counts, backend),
                   torch.cat(codes, 1))
        if return_loss_breakdown:
            return (*outputs, LossBreakdown.of(loss, commitment=commitment, codebook=codebook_term))
        return outputs

    @torch.no_grad()
    def encode(self, inputs: torch.Tensor, mask=None) -> torch.Tensor:
        """Codes only: int64 ``[B, L]`` (the forward's search, no state change, no autograd);
        ``decode_indices(encode(f))`` equals the eval-mode output."""
        training = self.training
        self.eval()
        try:
            return self.forward(inputs, mask)[3]
        finally:
            self.train(training)

    def codes_per_scale(self, codes: torch.Tensor) -> list:
        """int64 ``[B, L]`` -> one ``[B, h_s, w_s]`` per scale."""
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 \
                or codes.shape[1] != self.sequence_length:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"codes must be [B, {self.sequence_length}] (the scales' codes "
                             f"in sequence), got {shape}")
        parts = codes.split([h * w for h, w in self.scales], dim=1)
        return [p.reshape(codes.shape[0], h, w) for p, (h, w) in zip(parts, self.scales)]

    @torch.no_grad()
    def decode_indices(self, codes) -> torch.Tensor:
        """int64 ``codes [B, L]`` in ``[0, K)``, or the per-scale maps ``[B, h_s, w_s]`` as a
        list (``codes_per_scale``'s) -> ``f_hat [B, D, H, W]`` fp32 at ``input_size`` (the
        eval-mode output's shape; ``[B, H, W, D]`` with ``channel_last``). Other values raise
        ``ValueError``."""
        if isinstance(codes, (list, tuple)):
            if len(codes) != len(self.scales) or not all(
                    isinstance(c, torch.Tensor) and tuple(c.shape[1:]) == s
                    for c, s in zip(codes, self.scales)):
                raise ValueError(f"per-scale codes must be {len(self.scales)} maps [B, h, w] "
                                 f"of sizes {self.scales}")
            codes = torch.cat([c.reshape(c.shape[0], -1) for c in codes], 1)
        per_scale = self.codes_per_scale(codes)
        check_codes(codes, self.num_embeddings, dropped_ok=False)
        size = self.input_size
        codebook = self.codebook.detach().float()
        f_hat = 0.0
        for s, c in enumerate(per_scale):
            h = F.embedding(c, codebook).permute(0, 3, 1, 2)
            f_hat = f_hat + self.quant_resi[self._phi_of_scale[s]](self._up(h, size))
        return self._channels_first_in_layout(f_hat)

    def _syncing(self) -> bool:
        wanted = self.sync_distributed is None or bool(self.sync_distributed)
        return self.ema and wanted and quantizer_base._world_size() > 1

    @torch.no_grad()
    def _update(self, counts, code_sums, loss, rows, backend):
        """One EMA update from every scale's counts and sums, then dead-code re-seeding from
        the finest scale's residuals ``rows [B, D, S]``."""
        not_finite = None
        if self._syncing():
            counts, code_sums, not_finite = _all_reduce_statistics(counts, code_sums,
                                                                   ~torch.isfinite(loss))
        # re-seeding in the update's own pass, unless rank 0's rows must be broadcast first
        fused = self.dead_code_threshold > 0 and not_finite is None
        applied = VF.ema_update(counts, code_sums, loss, not_finite, self.ema_cluster_size,
                                self.ema_weight, self.codebook, self.ema_decay_weight,
                                self.skipped_batches, self.decay, self.epsilon, backend,
                                reseed=(rows, self._reseed_key, self.reseeded_codes,
                                        self.dead_code_threshold) if fused else None)
        if self.dead_code_threshold > 0 and not fused:
            reseed_dead_codes(self, rows, applied > 0)

    def corrected_cluster_size(self) -> torch.Tensor:
        """``[K]`` EMA cluster sizes divided by ``1 - decay**t`` (see ``VectorQuantizerEMA``)."""
        return self.ema_cluster_size / self.ema_decay_weight.clamp_min(1e-30)

    @torch.no_grad()
    def _kmeans(self, f, backend):
        """The codebook from k-means of the batch's vectors (rank 0's)."""
        rows = f.movedim(1, -1).reshape(-1, f.shape[1])
        centroids, counts = kmeans(rows, self.num_embeddings, self.kmeans_iters, backend,
                                   self.precision)
        adopt_kmeans(self, self.codebook, centroids, counts.float().clamp_min(1))
