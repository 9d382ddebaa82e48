"""Drop-in quantizer modules: ``VectorQuantizer`` and ``VectorQuantizerEMA``."""

import math
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import functional as VF
from . import quantizer_base as base
from .ops import step_plans
from .ops.vq import _Quantize, _nearest_code_op
# (re-exported: vqfast.modules stays the one import for the quantizers' shared pieces)
from .codebook_upkeep import (  # noqa: F401
    SingleCodebookUpkeep, _all_reduce_statistics, adopt_kmeans, check_codebook_options, kmeans, kmeans_done,
    reseed_dead_codes, rows_seen, take_kmeans_ema_state, usage_report, warn_skipped,
    without_real_rows_nan)
from .quantizer_base import (  # noqa: F401
    CodebookUsage, CollapseWatch, LossBreakdown, Projection, QuantizerCommon, _is_int,
    check_codes, check_count, check_mask, check_number, keep_fp32, real_rows,
    rename_legacy_keys)


class _QuantizerBase(SingleCodebookUpkeep, QuantizerCommon, nn.Module):
    """Shared input handling: channels-first in, flat ``[N, D]`` through the fused op, back out."""

    _legacy_keys: dict = {}

    def __init__(self, num_embeddings, embedding_dim, commitment_cost, return_onehot, backend,
                 precision, kmeans_init, kmeans_iters, cosine=False, codebook_dim=None,
                 rotation_trick=False, dead_code_threshold=0.0, channel_last=False):
        super().__init__()
        self.channel_last = bool(channel_last)
        if not (dead_code_threshold >= 0.0 and math.isfinite(dead_code_threshold)):
            raise ValueError(f"dead_code_threshold must be a finite number >= 0, got "
                             f"{dead_code_threshold}")
        self.dead_code_threshold = dead_code_threshold
        check_number("commitment_cost", commitment_cost)
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"num_embeddings and embedding_dim must be >= 1, got "
                             f"{num_embeddings} and {embedding_dim}")
        if codebook_dim is not None and (not isinstance(codebook_dim, int) or codebook_dim < 1):
            raise ValueError(f"codebook_dim must be an int >= 1, got {codebook_dim!r}")
        self.cosine, self.rotation_trick = cosine, rotation_trick
        self.code_dim = codebook_dim or embedding_dim
        self.project_in = self.project_out = None
        if codebook_dim is not None:  # factorized codes: D -> d before the lookup, d -> D after
            self.project_in = Projection(embedding_dim, codebook_dim)
            self.project_out = Projection(codebook_dim, embedding_dim)
        if precision not in VF.PRECISIONS:
            raise ValueError(f"precision must be one of {VF.PRECISIONS}, got {precision!r}")
        VF.check_backend(backend)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = commitment_cost
        self.return_onehot = return_onehot
        self.backend = backend
        self.precision = precision
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        # Whether k-means has run, as a Python flag beside the buffer: the training step
        # tests it without reading the device (no host sync, no data-dependent graph break).
        self._kmeans_done = not kmeans_init
        if kmeans_init:
            # Persistent, so a checkpoint taken after the k-means step is not re-initialised.
            self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self):
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"commitment_cost={self.commitment_cost}, backend={self.backend!r}")

    def _vectors(self, inputs: torch.Tensor):
        """Validate ``inputs: [B, D, *spatial]`` (``[B, *spatial, D]`` channel-last); return
        ``x: [B, D, S]`` (``[N, D, 1]``; a view when ``inputs`` is contiguous: the kernels read
        either layout in place) and the backend."""
        x = self._vectors_of("inputs", inputs, self.embedding_dim)
        if x.device != self._device():
            raise ValueError(f"inputs are on {x.device} but the codebook is on "
                             f"{self._device()}; move the module with .to(device)")
        return x, VF.resolve_backend(self.backend, x.device)

    def nearest(self, x: torch.Tensor):
        """Nearest codes of flat ``x: [N, D]`` -> ``(idx int64 [N], sqdist fp32 [N])``; no state change."""
        return VF.nearest_code(x, self.codebook.detach(), backend=self.backend,
                               precision=self.precision)

    def _prepare(self, inputs, mask):
        """Validate; ``(x [B, D, S], z [B, d, S] (projected when codebook_dim), mask [N] or
        None, backend)``."""
        x, backend = self._vectors(inputs)
        flat_mask = check_mask(mask, x, self._positions(inputs))
        z = self.project_in(x) if self.project_in is not None else x
        return x, z, flat_mask, backend

    def _device(self) -> torch.device:
        return self.codebook.device

    def _quantize(self, z, flat_mask, codebook_loss, update, backend, codebook=None, usage=None):
        """``(q, loss, idx [N], perplexity, counts [K], code_sums [K, d])``: the fused
        single-codebook op, or, with cosine codes, the rotation trick or a mask, the
        residual op as one level of one group (those options live there, once).
        ``codebook``: the codes to use (default ``self.codebook``); ``usage``: see
        ``vqfast.functional.quantize`` (the plain op only)."""
        codebook = self.codebook if codebook is None else codebook
        # frozen: the codebook takes no gradient (the loss keeps its value)
        codebook = codebook.detach() if self.freeze_codebook else codebook
        if not self._fused_path(flat_mask):
            return VF.quantize(z, codebook, self.commitment_cost, codebook_loss, update,
                               backend, self.precision, usage)
        from .ops.residual_vq import residual_quantize
        # cosine: the codes as unit vectors, whatever was stored (a loaded or hand-set codebook)
        codebook = F.normalize(codebook, dim=-1) if self.cosine else codebook
        q, loss, idx, perplexity, counts, code_sums, _ = residual_quantize(
            z, codebook.unsqueeze(0), 1, cosine=self.cosine, mask=flat_mask,
            commitment_cost=self.commitment_cost, codebook_loss=codebook_loss,
            rotation_trick=self.rotation_trick, with_code_sums=update, backend=backend,
            precision=self.precision)
        return q, loss, idx[0], perplexity[0], counts[0], code_sums[0] if update else code_sums

    def forward(self, inputs, mask=None, return_loss_breakdown=False):
        """``(loss, quantized, perplexity, encodings)`` of ``inputs [B, D, *spatial]``; see
        the class. On the Triton backend a steady step without ``mask`` or the breakdown
        replays its recorded launches (``vqfast.ops.step_plans``)."""
        if mask is None and not return_loss_breakdown:
            return step_plans.call(self, inputs, self._forward, _Quantize)
        return self._forward(inputs, mask, return_loss_breakdown)

    def _flat_shape(self, inputs) -> tuple:
        """The view of (contiguous) ``inputs`` the ops take: ``[B, D, S]`` (``[N, D, 1]``)."""
        return (-1, inputs.shape[-1], 1) if self.channel_last else (*inputs.shape[:2], -1)

    def _fused_path(self, flat_mask) -> bool:
        """Whether the step takes the residual op (cosine, rotation trick or a mask)."""
        return self.cosine or self.rotation_trick or flat_mask is not None

    @torch.no_grad()
    def encode(self, inputs: torch.Tensor, mask=None) -> torch.Tensor:
        """Codes only: int64 ``[B, *spatial]`` for ``inputs [B, D, *spatial]`` (-1 where
        ``mask`` is False). The nearest-code search alone (no gather, losses, perplexity,
        state change or autograd), the same search the forward runs: ``decode_indices(
        encode(x))`` equals the eval-mode output. fp32, fp16 and bf16 inputs."""
        x, z, flat_mask, backend = self._prepare(inputs, mask)
        if self._fused_path(flat_mask):
            _, _, idx, _, _, _ = self._quantize(z, flat_mask, False, False, backend)
        else:
            idx, _ = _nearest_code_op(z, self.codebook.detach().contiguous(), backend,
                                      self.precision)
        return idx.view(self._positions(inputs))

    def _outputs(self, inputs, x, q, loss, idx, perplexity, flat_mask):
        if self.project_out is not None:
            q = self.project_out(q)
            if flat_mask is not None:  # masked positions give back their input
                q = torch.where(flat_mask.view(x.shape[0], 1, -1), q, x)
        if self.return_onehot:
            encodings = F.one_hot(idx.clamp_min(0), self.num_embeddings).float()
            encodings = encodings * (idx >= 0)[:, None]
        else:
            encodings = idx.view(self._positions(inputs))
        return loss, q.to(inputs.dtype).view(inputs.shape), perplexity, encodings

    @torch.no_grad()
    def decode_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes`` int64 ``[B, *spatial]`` in ``[0, K)`` (-1: not quantized) -> their codes,
        fp32 ``[B, D, *spatial]`` (normalised when ``cosine``, projected back with
        ``codebook_dim``). Other values raise ``ValueError``."""
        check_codes(codes, self.num_embeddings)
        codebook = self.codebook.detach().float()
        if self.cosine:
            codebook = F.normalize(codebook, dim=-1)
        rows = F.embedding(codes.clamp_min(0), codebook) * (codes >= 0)[..., None]
        if self.project_out is not None:  # as the forward projects: [N, d, 1] or [B, d, S]
            d = rows.shape[-1]
            if self.channel_last:
                rows = self.project_out(rows.reshape(-1, d, 1))
            else:
                rows = self.project_out(rows.reshape(rows.shape[0], -1, d).transpose(1, 2)
                                        .contiguous()).transpose(1, 2)
            rows = rows.reshape(*codes.shape, -1)
        return self._rows_in_layout(rows)

    def _state_options(self):
        return {"cosine": self.cosine, "codebook_dim": None if self.project_in is None else self.code_dim}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        rename_legacy_keys(state_dict, prefix, self._legacy_keys)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _maybe_kmeans_init(self, x: torch.Tensor, backend: str, flat_mask=None) -> None:
        """On the first training batch: the codebook from k-means of rank 0's batch.

        Eagerly, a batch with NaN/Inf raises before any state changes; inside a compiled
        graph (no raising there) such a batch leaves the codebook and the flag as they were.
        """
        if self.training and not self._kmeans_done and not self.freeze_codebook:
            self._kmeans_init(x, backend, flat_mask)


#: The original algorithm's arguments (van den Oord et al.; the notebook): random init,
#: no k-means, no dead-code re-seeding. ``VectorQuantizerEMA(K, D, 0.25, 0.99,
#: **vqfast.ORIGINAL_ALGORITHM)`` is the notebook's quantizer; it can collapse the codebook.
ORIGINAL_ALGORITHM = types.MappingProxyType({"kmeans_init": False, "dead_code_threshold": 0.0})

#: EMA decay of the learned-codebook quantizer's per-code usage (for dead-code re-seeding).
USAGE_DECAY = 0.99


class VectorQuantizer(_QuantizerBase):
    """Vector quantizer with a learned codebook (van den Oord et al., codebook loss).

    Args:
        num_embeddings: K, the number of codes.
        embedding_dim: D, the channel count of the inputs.
        commitment_cost: beta, the weight of the commitment (encoder) loss.
        return_onehot: return the original notebook's ``[N, K]`` one-hot as ``encodings`` instead of
            int64 indices shaped ``[B, *spatial]``.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.
        precision: Triton dot precision for fp32 inputs, see ``vqfast.nearest_code``.
        kmeans_init: initialise the codebook from the first training batch with
            ``kmeans_iters`` Lloyd iterations (on rank 0's batch, broadcast to all ranks).
            On by default: with ``dead_code_threshold`` it keeps the codebook from
            collapsing onto a few codes (README: Training quality).
        dead_code_threshold: codes whose usage (an EMA, decay ``USAGE_DECAY``, of how many
            vectors chose them per training batch, bias-corrected) falls below it are
            re-seeded at the next training forward, before its lookup, from random rows of
            that batch (rank 0's: every rank re-seeds the same codes), starting at a usage
            of ``max(dead_code_threshold, 1)``. Decided on the device: no host sync.
            Default 1.0; 0 turns it off. The original algorithm is
            ``**vqfast.ORIGINAL_ALGORITHM`` (``kmeans_init=False, dead_code_threshold=0``).
        cosine: l2-normalise inputs and codes; nearest = largest cosine similarity
            (ViT-VQGAN); the output is the normalised code.
        codebook_dim: d; learned projections ``D -> d`` before the lookup and ``d -> D``
            after it (factorized codes; ``codebook`` is then ``[K, d]``).
        rotation_trick: the gradient of the rotation trick (Fifty et al., 2024) instead of
            straight-through: the input receives ``|q|/|e| R^T g``, R rotating e onto q.
        freeze_codebook: (also an attribute) training-mode forwards compute the losses and
            the input's gradient but never change the codebook: no codebook gradient (the
            loss keeps its value), no k-means init; the EMA quantizer skips its update.
            For fine-tuning a decoder or a language model on a trained tokenizer.
        channel_last: inputs ``[B, *spatial, D]`` (transformer tokens ``[B, N, D]``) instead
            of ``[B, D, *spatial]``; ``quantized`` has the inputs' shape, codes and ``mask``
            are ``[B, *spatial]``, ``decode_indices`` returns ``[B, *spatial, D]``. Read in
            place (the rows layout) on both backends: no transpose copy.

    ``VectorQuantizerEMA.accumulate()``: a context manager for gradient accumulation (one
    EMA update for the micro-batches inside it; see its docstring).

    ``forward(..., return_loss_breakdown=True)`` appends a ``LossBreakdown`` (commitment and
    codebook terms, each with its own gradient, summing to ``loss``; for the learned
    codebook it costs a second search).

    ``encode(inputs, mask=None)``: the codes alone (nearest-code search only, no autograd),
    ``[B, *spatial]``; ``decode_indices(encode(x))`` equals the eval-mode ``quantized``.

    ``forward(inputs: [B, D, *spatial], mask=None)`` returns ``(loss, quantized,
    perplexity, encodings)`` with ``loss = q_latent_loss + commitment_cost * e_latent_loss``
    and ``quantized`` the straight-through output (value of the nearest codes, gradient of
    the identity). ``mask`` (bool ``[B, *spatial]``, True = a real position): masked
    positions take no part in the losses, counts or perplexity; their code is -1 and
    their output the input. ``codebook`` is an ``nn.Parameter`` ``[K, D]`` initialised
    ``uniform(-1/K, 1/K)`` (then k-means). Buffers (fp32 whatever the module is cast to):
    ``ema_cluster_size [K]`` (the usage EMA), ``ema_decay_weight`` (``1 - decay**t``),
    ``reseeded_codes`` (int64); ``codebook_usage()`` reports them.
    """

    _legacy_keys = {"_embedding.weight": "codebook"}

    _FP32_STATE = ("ema_cluster_size", "ema_decay_weight")

    def __init__(self, num_embeddings, embedding_dim, commitment_cost=0.25, *,
                 return_onehot=False, backend="auto", precision="ieee", kmeans_init=True,
                 kmeans_iters=10, dead_code_threshold=1.0, cosine=False, codebook_dim=None,
                 rotation_trick=False, freeze_codebook=False, channel_last=False):
        super().__init__(num_embeddings, embedding_dim, commitment_cost, return_onehot, backend,
                         precision, kmeans_init, kmeans_iters, cosine, codebook_dim, rotation_trick,
                         dead_code_threshold, channel_last)
        self.freeze_codebook = freeze_codebook
        self.codebook = nn.Parameter(torch.empty(num_embeddings, self.code_dim).uniform_(
            -1 / num_embeddings, 1 / num_embeddings))
        self._register_usage_state()

    def _apply(self, fn, recurse=True):
        return keep_fp32(self, self._FP32_STATE, fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._default_trained_state(state_dict, prefix, self.num_embeddings)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _forward(self, inputs, mask=None, return_loss_breakdown=False):
        x, z, flat_mask, backend = self._prepare(inputs, mask)
        self._maybe_kmeans_init(z, backend, flat_mask)
        tracking = self.training and not self.freeze_codebook and self.dead_code_threshold > 0
        # eagerly, re-seeding is one launch and the usage EMA rides on the op's own pass,
        # unless steps between are needed (the residual op's options, counts from every rank)
        fused = (tracking and not self._fused_path(flat_mask) and not self._syncing()
                 and not torch.compiler.is_compiling())
        if fused:  # before the op saves the codebook for its backward
            VF.reseed_codes(self.ema_cluster_size, self.ema_decay_weight, self.codebook.detach(),
                            z, self._reseed_key, self.reseeded_codes, self.dead_code_threshold,
                            backend)
        elif tracking:
            self._reseed_dead_codes(z, self.ema_decay_weight > 0, flat_mask)
        usage = ((self.ema_cluster_size, self.ema_decay_weight, self._reseed_key, USAGE_DECAY)
                 if fused else None)
        q, loss, idx, perplexity, counts, _ = self._quantize(z, flat_mask, True, False, backend,
                                                             usage=usage)
        if tracking and not fused:
            self._track_usage(counts)
        self._watch_usage(counts)
        outputs = self._outputs(inputs, x, q, loss, idx, perplexity, flat_mask)
        if not return_loss_breakdown:
            return outputs
        # the commitment term alone, with its own gradient (to the input only): the same
        # search without the codebook loss (a second pass, only when asked for)
        commitment = self._quantize(z, flat_mask, False, False, backend)[1]
        return (*outputs, LossBreakdown.of(loss, commitment=commitment.float(),
                                           codebook=(loss - commitment).float()))

    @torch.no_grad()
    def _track_usage(self, counts):
        """The per-code usage EMA (``USAGE_DECAY``), on the device, counts summed over ranks
        so that every rank re-seeds the same codes. The dead codes it finds are re-seeded
        at the next training forward, from its rows, before the codebook is used (the
        parameter must not change between a forward and its backward)."""
        counts = counts.float()
        if self._syncing():
            dist.all_reduce(counts)
        seen = counts.sum() > 0  # a batch of padding alone leaves the usage as it is
        decay = torch.where(seen, USAGE_DECAY, 1.0)
        self.ema_cluster_size.mul_(decay).add_(counts * (1 - decay))
        self.ema_decay_weight.mul_(decay).add_(1 - decay)

    @torch.no_grad()
    def codebook_usage(self, threshold: float | None = None) -> CodebookUsage:
        """Per-code usage (an EMA of each code's count per training batch, decay
        ``USAGE_DECAY``, tracked when ``dead_code_threshold > 0``), dead and alive codes and
        re-seeds (host sync). Dead: bias-corrected usage below ``threshold`` (default
        ``dead_code_threshold`` if set, else 1)."""
        return usage_report(self.ema_cluster_size, self.corrected_cluster_size(),
                            threshold or self.dead_code_threshold or 1.0, self.reseeded_codes, 0)


class VectorQuantizerEMA(_QuantizerBase):
    """Vector quantizer whose codebook follows an exponential moving average of its inputs.

    Args:
        num_embeddings, embedding_dim, commitment_cost: as for ``VectorQuantizer``.
        decay: EMA decay of the cluster sizes and sums (0.99 in the paper).
        epsilon: Laplace smoothing of the cluster sizes.
        return_onehot, backend, precision, kmeans_init, kmeans_iters, cosine, codebook_dim,
        rotation_trick: as for ``VectorQuantizer`` (with ``cosine`` the EMA runs on
            normalised inputs and re-normalises the codes after each update)
            (after k-means, ``ema_cluster_size`` holds the k-means counts, at least 1, and
            ``ema_weight = codebook * ema_cluster_size``).
        dead_code_threshold: if > 0, after each EMA update the codes whose bias-corrected
            EMA cluster size fell below it are re-seeded from random rows of the current batch
            (rank 0's, broadcast, so every rank makes the same choice), starting at a size
            of ``max(dead_code_threshold, 1)`` so that a used code survives. Decided on the
            device: no host sync. Default 0.5 (with ``kmeans_init=True``, the default: the
            pair that keeps the codebook in use; a re-seeded code then has ~70 updates to
            be chosen before it counts as dead again, and 0.5 trained better than 1.0 in
            the README's quality run); ``**vqfast.ORIGINAL_ALGORITHM``
            (``kmeans_init=False, dead_code_threshold=0``) is the paper's algorithm.
        sync_distributed: all-reduce the per-code counts and sums across ranks (one packed
            collective) before the EMA finalize, so every rank applies the same, global update.
            ``None`` (default): on when ``torch.distributed`` is initialised with more than one rank.
        check_finite: raise ``ValueError`` on a training batch holding NaN/Inf, before any
            state changes. Costs one host sync per step, so it is off by default: without
            it such a batch's EMA update is skipped on the device and counted in
            ``skipped_batches`` (``codebook_usage()`` warns about it).

    Buffers (no optimizer touches them): ``codebook [K, D]`` (init ``normal(0, 1)``),
    ``ema_cluster_size [K]`` and ``ema_weight [K, D]``, all fp32 whatever the module is
    cast to (``.half()`` moves them, it does not round them), updated in place in training
    mode only, after the output was taken from the old codebook; ``ema_decay_weight``
    (0-d, ``1 - decay**t`` after ``t`` updates, 1 after k-means init or a loaded trained
    checkpoint), which bias-corrects the cluster sizes for the dead-code rule as Adam does
    (``ema_cluster_size / ema_decay_weight``); counters ``reseeded_codes`` and
    ``skipped_batches`` (int64). ``loss = commitment_cost * e_latent_loss``.

    A training batch whose per-code sums or squared errors are not finite (NaN/Inf
    inputs, or finite inputs above ~1e19 whose squares overflow fp32) leaves the EMA state
    untouched and increments ``skipped_batches``; ``quantized`` and ``loss`` still carry
    the non-finite values, so the training loop sees them.
    """

    _legacy_keys = {"_embedding.weight": "codebook", "_ema_w": "ema_weight",
                    "_ema_cluster_size": "ema_cluster_size"}
    _FP32_STATE = ("codebook", "ema_cluster_size", "ema_weight", "ema_decay_weight")

    def __init__(self, num_embeddings, embedding_dim, commitment_cost=0.25, decay=0.99,
                 epsilon=1e-5, *, return_onehot=False, backend="auto", precision="ieee",
                 kmeans_init=True, kmeans_iters=10, dead_code_threshold=0.5,
                 sync_distributed=None, check_finite=False, cosine=False, codebook_dim=None,
                 rotation_trick=False, freeze_codebook=False, channel_last=False):
        super().__init__(num_embeddings, embedding_dim, commitment_cost, return_onehot, backend,
                         precision, kmeans_init, kmeans_iters, cosine, codebook_dim, rotation_trick,
                         dead_code_threshold, channel_last)
        self.freeze_codebook = freeze_codebook
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if not epsilon > 0.0 or not math.isfinite(epsilon):
            raise ValueError(f"epsilon must be a positive finite number, got {epsilon}")
        self.sync_distributed = sync_distributed
        self.check_finite = check_finite
        self.decay = decay
        self.epsilon = epsilon
        codebook = torch.randn(num_embeddings, self.code_dim)
        self.register_buffer("codebook", F.normalize(codebook, dim=-1) if cosine else codebook)
        self._register_usage_state(ema_weight=torch.randn(num_embeddings, self.code_dim))
        self.register_buffer("skipped_batches", torch.tensor(0, dtype=torch.int64))

    def extra_repr(self):
        return f"{super().extra_repr()}, decay={self.decay}, epsilon={self.epsilon}"

    def _apply(self, fn, recurse=True):
        return keep_fp32(self, self._FP32_STATE, fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        rename_legacy_keys(state_dict, prefix, self._legacy_keys)
        self._default_trained_state(state_dict, prefix, self.num_embeddings)
        state_dict.setdefault(prefix + "skipped_batches", torch.tensor(0, dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _forward(self, inputs, mask=None, return_loss_breakdown=False):
        x, z, flat_mask, backend = self._prepare(inputs, mask)
        update = self.training and not self.freeze_codebook
        if update and self.check_finite and not torch.compiler.is_compiling() \
                and not bool(torch.isfinite(x).all()):
            raise ValueError("inputs contain NaN or Inf; the EMA state was left unchanged")
        self._maybe_kmeans_init(z, backend, flat_mask)
        q, loss, idx, perplexity, counts, code_sums = self._quantize(z, flat_mask, False, update,
                                                                    backend)
        if update and self._accumulated is not None:  # inside accumulate(): sum, update later
            self._accumulate(z, loss.detach(), counts, code_sums, backend, flat_mask)
        elif update:
            self._update(z, loss.detach(), counts, code_sums, backend, flat_mask)
        self._watch_usage(counts)
        outputs = self._outputs(inputs, x, q, loss, idx, perplexity, flat_mask)
        if return_loss_breakdown:
            return (*outputs, LossBreakdown.of(loss, commitment=loss.float()))
        return outputs

    def accumulate(self):
        """Gradient accumulation: the training forwards inside the block add their per-code
        counts and sums to one accumulator instead of moving the EMA; leaving the block
        applies one EMA update with them (one all-reduce under ``torch.distributed``), equal
        up to fp32 rounding to one forward of the concatenated micro-batches. A non-finite
        micro-batch skips the whole update. k-means init runs on the first micro-batch;
        dead-code re-seeding draws from the last one. No host sync.

        ``with vq.accumulate(): for micro in batches: loss, q, _, _ = vq(micro); ...``
        """
        return self._accumulation_window()

    @torch.no_grad()
    def _accumulate(self, x, loss, counts, code_sums, backend, flat_mask):
        acc = self._accumulated
        if acc:
            counts, code_sums, loss = acc["counts"] + counts, acc["code_sums"] + code_sums, acc["loss"] + loss
            if flat_mask is None and acc["flat_mask"] is not None:  # a mask anywhere: count real rows
                flat_mask = torch.ones(x.shape[0] * x.shape[2], dtype=torch.bool, device=x.device)
        acc.update(x=x, loss=loss, counts=counts, code_sums=code_sums, backend=backend,
                   flat_mask=flat_mask)

    @torch.no_grad()
    def _update(self, x, loss, counts, code_sums, backend, flat_mask=None):
        """EMA update, skip accounting and dead-code re-seeding, all decided on the device."""
        not_finite = None
        if self._syncing():  # every rank skips (or applies) the same batches
            counts, code_sums, not_finite = _all_reduce_statistics(
                counts, code_sums, ~torch.isfinite(loss))
        # re-seeding in the update's own pass, unless it needs the steps between them
        # (renormalised codes, masked rows, rank 0's rows)
        fused = (self.dead_code_threshold > 0 and not self.cosine and flat_mask is None
                 and not_finite is None)
        applied = VF.ema_update(counts, code_sums, loss, not_finite, self.ema_cluster_size,
                                self.ema_weight, self.codebook, self.ema_decay_weight,
                                self.skipped_batches, self.decay, self.epsilon, backend,
                                rows_seen(counts, flat_mask),
                                reseed=(x, self._reseed_key, self.reseeded_codes,
                                        self.dead_code_threshold) if fused else None)
        if self.cosine:  # the EMA of unit vectors is not one: back onto the sphere
            self.codebook.copy_(torch.where(applied > 0, F.normalize(self.codebook, dim=-1),
                                            self.codebook))
        if self.dead_code_threshold > 0 and not fused:
            self._reseed_dead_codes(x, applied > 0, flat_mask)

    def _syncing(self) -> bool:
        wanted = self.sync_distributed is None or bool(self.sync_distributed)
        return wanted and base._world_size() > 1

    @torch.no_grad()
    def codebook_usage(self, threshold: float | None = None) -> CodebookUsage:
        """Per-code EMA usage, dead and alive codes, re-seeds and skipped batches (host sync).

        A code is dead when its bias-corrected EMA cluster size (its decayed count of
        assigned vectors per batch, see ``corrected_cluster_size``) is below ``threshold``:
        by default ``dead_code_threshold`` if set, else 1. Warns if batches were skipped.
        """
        if threshold is None:
            threshold = self.dead_code_threshold or 1.0
        report = usage_report(self.ema_cluster_size, self.corrected_cluster_size(), threshold,
                              self.reseeded_codes, self.skipped_batches)
        warn_skipped(report.skipped_batches)
        return report
