"""``ResidualVQ``: residual, grouped, shared-codebook, cosine and factorized VQ, every
level of every group in one fused launch (SoundStream, EnCodec, DAC, ViT-VQGAN)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import functional as VF
from . import modules
from . import residual_levels
from .codebook_upkeep import register_codebook_state
from .modules import (LossBreakdown, Projection, QuantizerCommon, check_codebook_options,
                      check_codes, check_mask, check_number, keep_fp32)
from .ops.residual_vq import residual_codes, residual_quantize
from .residual_upkeep import _SIZE_RULES, ResidualUpkeep


def _check_codec_options(num_quantizers, cosine, codebook_dim, level_projections,
                         level_strides, eval_loss, codes_layout):
    if cosine not in (False, True, "search") or isinstance(cosine, int) and not isinstance(
            cosine, bool):
        raise ValueError(f"cosine must be False, True or 'search', got {cosine!r}")
    if level_projections and codebook_dim is None:
        raise ValueError("level_projections project each level D -> codebook_dim: pass "
                         "codebook_dim")
    if level_strides is not None and (
            not isinstance(level_strides, (tuple, list)) or len(level_strides) != num_quantizers
            or not all(modules._is_int(s) and s >= 1 for s in level_strides)):
        raise ValueError(f"level_strides must hold one int >= 1 per level (num_quantizers="
                         f"{num_quantizers}), got {level_strides!r}")
    if level_strides is not None and codebook_dim is not None and not level_projections:
        raise ValueError("level_strides with codebook_dim: pass level_projections=True (each "
                         "level projects its own pooled residual)")
    if eval_loss not in ("commitment", "zero"):
        raise ValueError(f"eval_loss must be 'commitment' or 'zero', got {eval_loss!r}")
    if codes_layout not in ("batch_first", "levels_first"):
        raise ValueError(f"codes_layout must be 'batch_first' or 'levels_first', got "
                         f"{codes_layout!r}")


class ResidualVQ(ResidualUpkeep, QuantizerCommon, nn.Module):
    """Residual vector quantization (SoundStream, EnCodec, DAC), optionally grouped.

    Level ``l`` quantizes the residual ``r_l = x - (q_0 + ... + q_{l-1})`` of its group with
    the nearest code of its codebook; the output is ``q_0 + ... + q_{Q-1}`` with the
    gradient of the identity (straight-through on the sum, as in DAC) or, with
    ``rotation_trick``, of the rotation of each group's input onto its sum.

    Args:
        num_quantizers: Q, the levels per group.
        num_embeddings: K, codes per codebook; or a tuple of Q sizes, one per level (e.g.
            ``(1024, 512, 256)``): the codebooks are then stored padded to the largest,
            ``codebooks [G*Q, max K, d]`` (and the EMA buffers alike), rows past a level's
            size zero and never chosen; all levels still run in one fused launch.
        embedding_dim: D, the input channels.
        commitment_cost: beta. ``ema=True``: ``loss = beta * sum_l mse(r_l, q_l)``;
            ``ema=False``: ``loss = sum_l mse(q_l, sg(r_l)) + beta * mse(sg(q_l), r_l)``
            (with groups, each level's mse is over all D channels: the groups' squared
            errors summed, over ``N * D``).
        decay, epsilon: the EMA decay and Laplace smoothing (``ema=True``).
        ema: EMA codebooks (buffers) or learned ones (an ``nn.Parameter``).
        groups: G; group ``g`` quantizes channels ``g*D/G .. (g+1)*D/G`` with its own levels.
        shared_codebook: one codebook for all levels of a group.
        quantize_dropout: in training, each batch runs the first n levels, n uniform in
            1..Q (SoundStream); dropped levels get code -1.
        cosine: ``True``: l2-normalise the residuals and codes; nearest = largest cosine
            similarity; the EMA runs on normalised vectors and re-normalises the codes
            (ViT-VQGAN). ``"search"``: the nearest code by direction (residual and codes
            l2-normalised for the search only), the output, residuals, losses and EMA on
            the raw codes (DAC, descript-audio-codec, SNAC).
        codebook_dim: d; learned projections ``D -> G * d`` before the lookup and back
            after it (factorized codes); default ``D / G``.
        projection_bias: whether those projections have a bias (Mimi's do not).
        level_projections: each level projects the residual that reaches it ``D -> d``
            and its code back ``d -> D`` with its own projections (DAC; needs
            ``codebook_dim``): ``project_in[l]`` and ``project_out[l]``, ``vqfast``
            ``Projection`` modules (``nn.Linear`` weights ``[out, in]``, so
            ``torch.nn.utils.parametrizations.weight_norm`` applies). The levels then run
            one after another (one fused op each), and the next level's residual keeps its
            gradient through the projections, as in DAC.
        level_strides: one int per level (SNAC): level ``l`` quantizes its residual
            average-pooled over time by ``level_strides[l]`` and its output is repeated as
            many times (inputs ``[B, D, T]``, T a multiple of every stride); its codes are
            repeated likewise, ``[B, Q, T]``. Runs level by level, as ``level_projections``.
            Both are for learned codebooks (``ema=False``), one group, channels first.
        rotation_trick: the rotation trick's gradient (Fifty et al., 2024) instead of
            straight-through.
        kmeans_init, kmeans_iters: codebooks from k-means of the first training batch,
            level by level on its residuals (on by default).
        dead_code_threshold: re-seed codes whose bias-corrected EMA size falls below it
            from the residuals of their level (EMA only; see ``VectorQuantizerEMA``).
            Default: 1.0 with ``ema``, else 0. The defaults keep every level's codebook in
            use (README: Training quality); ``**vqfast.ORIGINAL_ALGORITHM`` turns both off.
        dead_code_rule: ``"absolute"`` (default: the rule above, after each EMA update) or
            ``"relative"`` (moshi's): every ``dead_code_every`` training steps, before the
            EMA update, the codes whose stored size is below ``dead_code_threshold`` (then
            default 0.1) times their codebook's mean size take a row of the residuals their
            level saw (a random permutation's first K rows, or K rows drawn with
            replacement from a smaller batch, as moshi draws them) at the mean size. (The
            steps are counted on the host: compiled, each count is its own graph.)
        sync_distributed: all-reduce every level's statistics in one packed collective.
        backend, precision: as for ``VectorQuantizer``.
        freeze_codebook: (also an attribute) training-mode forwards never change the
            codebooks: no EMA update, no codebook gradient, no k-means init.
        channel_last: inputs ``[B, *spatial, D]`` (tokens ``[B, N, D]``), codes ``[B,
            *spatial, G*Q]``, masks ``[B, *spatial]``; read in place, no transpose copy.
        kmeans_state: what k-means init leaves in the EMA state: ``"weighted"`` (default:
            ``ema_weight`` = centroids x cluster sizes, the sizes at least 1, so the next
            update continues the clusters) or ``"raw"`` (encodec's: ``ema_weight`` = the
            centroids, ``ema_cluster_size`` = the counts as they are).
        ema_size: ``"smoothed"`` (default: ``ema_cluster_size`` holds the Laplace-smoothed
            sizes, the original notebook's and Sonnet's rule), ``"raw"`` (it holds the
            decayed counts, smoothed only to divide: encodec's and vector-quantize-pytorch's
            rule) or ``"raw_clamped"`` (the decayed counts, the sums divided by ``max(size,
            epsilon)`` with no smoothing: moshi's rule).
        commitment_levels: ``"all"`` (default: every level's commitment term reaches the
            input) or ``"first"`` (only each group's first level's, as in encodec and moshi,
            whose later levels see detached residuals). The loss value is the same.
        eval_loss: ``"commitment"`` (default: eval-mode forwards return the loss as in
            training) or ``"zero"`` (a 0 loss outside training: encodec, DAC,
            vector-quantize-pytorch).
        codes_layout: ``"batch_first"`` (default: codes ``[B, G*Q, *spatial]``) or
            ``"levels_first"`` (``[G*Q, B, *spatial]``, EnCodec's and Mimi's), for what
            ``forward`` and ``encode`` return and ``decode_indices`` takes.

    encodec's ``ResidualVectorQuantization`` (trained from given codebooks, no k-means,
    no dead-code expiry) is ``ResidualVQ(Q, K, D, commitment_cost=w, decay=decay,
    epsilon=eps, kmeans_init=False, dead_code_threshold=0, ema_size="raw",
    commitment_levels="first")`` with ``codebooks``, ``ema_weight`` and
    ``ema_cluster_size`` its ``embed``, ``embed_avg`` and ``cluster_size``; its loss is the
    sum of encodec's per-level losses.

    ``forward(..., return_loss_breakdown=True)`` appends a ``vqfast.LossBreakdown`` (the
    commitment and codebook terms summed over levels, each with its own gradient, summing
    to ``loss``; with learned codebooks it costs a second residual search).

    ``encode(x, mask=None, *, num_levels=None)``: the codes alone, ``[B, G*n, *spatial]``
    (the residual search of the first ``n`` levels of each group, default all Q, no
    autograd); ``decode_indices(encode(x))`` equals the eval-mode output.

    ``forward(..., num_levels=n)``: only the first ``n`` levels of each group quantize
    (EnCodec's bandwidths, Mimi's ``num_quantizers``), in training too: the loss, output,
    perplexity ``[G*n]`` and codes ``[B, G*n, *spatial]`` are those of the ``n`` levels, and
    only their codebooks learn (quantize dropout then draws from ``1..n``).

    ``forward(x: [B, D, *spatial], mask=None)`` returns ``(loss, quantized, perplexity,
    codes)``: ``quantized [B, D, *spatial]`` in x's dtype, ``perplexity`` fp32 ``[G*Q]``,
    ``codes`` int64 ``[B, G*Q, *spatial]`` (level ``l`` of group ``g`` at ``g*Q + l``).
    ``mask`` bool ``[B, *spatial]``: False positions take no part in losses, counts or EMA
    statistics, their codes are -1 and their output is the input.

    State: ``codebooks [G*C, K, d]`` (C = Q, or 1 with ``shared_codebook``); with ``ema``
    the buffers ``ema_cluster_size [G*C, K]``, ``ema_weight [G*C, K, d]``,
    ``ema_decay_weight``, ``reseeded_codes`` and ``skipped_batches`` ``[G*C]``, all fp32
    (or int64) whatever the module is cast to.
    """

    _FP32_STATE = ("codebooks", "ema_cluster_size", "ema_weight", "ema_decay_weight")

    def __init__(self, num_quantizers, num_embeddings, embedding_dim, commitment_cost=0.25,
                 decay=0.99, epsilon=1e-5, *, ema=True, groups=1, shared_codebook=False,
                 quantize_dropout=False, cosine=False, codebook_dim=None, rotation_trick=False,
                 kmeans_init=True, kmeans_iters=10, dead_code_threshold=None,
                 sync_distributed=None, backend="auto", precision="ieee", freeze_codebook=False,
                 channel_last=False, ema_size="smoothed", commitment_levels="all",
                 projection_bias=True, level_projections=False, level_strides=None,
                 eval_loss="commitment", codes_layout="batch_first",
                 dead_code_rule="absolute", dead_code_every=1, kmeans_state="weighted"):
        super().__init__()
        if kmeans_state not in ("weighted", "raw"):
            raise ValueError(f"kmeans_state must be 'weighted' or 'raw', got {kmeans_state!r}")
        self.kmeans_state = kmeans_state
        if dead_code_rule not in ("absolute", "relative"):
            raise ValueError(f"dead_code_rule must be 'absolute' or 'relative', got "
                             f"{dead_code_rule!r}")
        if not (modules._is_int(dead_code_every) and dead_code_every >= 1):
            raise ValueError(f"dead_code_every must be an int >= 1, got {dead_code_every!r}")
        if dead_code_rule == "relative" and shared_codebook:
            raise ValueError("dead_code_rule='relative' re-seeds each level's codebook from "
                             "its residuals: not with shared_codebook")
        self.dead_code_rule, self.dead_code_every = dead_code_rule, int(dead_code_every)
        self._dead_code_countdown = self.dead_code_every
        _check_codec_options(num_quantizers, cosine, codebook_dim, level_projections,
                             level_strides, eval_loss, codes_layout)
        if codes_layout == "levels_first" and channel_last:
            raise ValueError("codes_layout='levels_first' is for channels-first inputs (codes "
                             "[G*Q, B, *spatial]); channel_last codes are [B, *spatial, G*Q]")
        if kmeans_state == "raw" and not ema:
            raise ValueError("kmeans_state='raw' sets the EMA state: ema=True only")
        if dead_code_every != 1 and dead_code_rule != "relative":
            raise ValueError("dead_code_every counts steps between moshi's expiries: "
                             "dead_code_rule='relative' only")
        cosine = cosine if cosine == "search" else bool(cosine)
        self.eval_loss, self.codes_layout = eval_loss, codes_layout
        self.level_projections = bool(level_projections)
        self.level_strides = tuple(level_strides) if level_strides is not None else None
        self._by_level = self.level_projections or self.level_strides is not None
        if self._by_level and (ema or groups != 1 or channel_last
                               or commitment_levels != "all"):
            raise ValueError("level_projections and level_strides run the levels one after "
                             "another with learned codebooks: they need ema=False, groups=1, "
                             "channel_last=False and commitment_levels='all'")
        if ema_size not in _SIZE_RULES:
            raise ValueError(f"ema_size must be one of {tuple(_SIZE_RULES)}, got {ema_size!r}")
        if commitment_levels not in ("all", "first"):
            raise ValueError(f"commitment_levels must be 'all' or 'first', got "
                             f"{commitment_levels!r}")
        self.ema_size, self.commitment_levels = ema_size, commitment_levels
        self.channel_last = bool(channel_last)
        level_sizes = None
        if isinstance(num_embeddings, (tuple, list)):
            level_sizes = tuple(num_embeddings)
            if len(level_sizes) != num_quantizers or not all(
                    isinstance(k, int) and k >= 1 for k in level_sizes):
                raise ValueError(f"num_embeddings as a tuple needs one int >= 1 per level "
                                 f"(num_quantizers={num_quantizers}), got {num_embeddings!r}")
            if shared_codebook and len(set(level_sizes)) > 1:
                raise ValueError("shared_codebook: the levels share one codebook, so one size")
            num_embeddings = max(level_sizes)
        for name, value in (("num_quantizers", num_quantizers), ("num_embeddings", num_embeddings),
                            ("embedding_dim", embedding_dim), ("groups", groups)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if codebook_dim is None and embedding_dim % groups:
            raise ValueError(f"embedding_dim={embedding_dim} is not divisible by groups={groups}")
        if codebook_dim is not None and (not isinstance(codebook_dim, int) or codebook_dim < 1):
            raise ValueError(f"codebook_dim must be an int >= 1, got {codebook_dim!r}")
        check_number("commitment_cost", commitment_cost)
        dead_code_threshold = check_codebook_options(
            ema=ema, decay=decay, epsilon=epsilon, dead_code_threshold=dead_code_threshold,
            default_threshold=(0.1 if dead_code_rule == "relative" else 1.0) if ema else 0.0,
            precision=precision, backend=backend)
        self.num_quantizers, self.num_embeddings = num_quantizers, num_embeddings
        self.embedding_dim, self.groups = embedding_dim, groups
        self.commitment_cost, self.decay, self.epsilon = commitment_cost, decay, epsilon
        self.ema, self.shared_codebook = ema, shared_codebook
        self.freeze_codebook = freeze_codebook
        self.quantize_dropout, self.cosine, self.rotation_trick = quantize_dropout, cosine, rotation_trick
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.dead_code_threshold, self.sync_distributed = dead_code_threshold, sync_distributed
        self.backend, self.precision = backend, precision
        self.code_dim = codebook_dim or embedding_dim // groups
        self.project_in = self.project_out = None
        if level_projections:
            self.project_in = nn.ModuleList(
                Projection(embedding_dim, codebook_dim, bias=projection_bias)
                for _ in range(num_quantizers))
            self.project_out = nn.ModuleList(
                Projection(codebook_dim, embedding_dim, bias=projection_bias)
                for _ in range(num_quantizers))
        elif codebook_dim is not None:
            self.project_in = Projection(embedding_dim, groups * codebook_dim, bias=projection_bias)
            self.project_out = Projection(groups * codebook_dim, embedding_dim,
                                          bias=projection_bias)
        books = groups * (1 if shared_codebook else num_quantizers)
        self.level_sizes = level_sizes if level_sizes and len(set(level_sizes)) > 1 else None
        codebooks = torch.randn(books, num_embeddings, self.code_dim)
        if cosine is True:
            codebooks = F.normalize(codebooks, dim=-1)
        if self.level_sizes is not None:  # per book: its size, and which rows are codes
            sizes = torch.tensor(self.level_sizes * groups, dtype=torch.int32)
            self.register_buffer("book_sizes", sizes, persistent=False)
            self.register_buffer("real_codes", torch.arange(num_embeddings) < sizes[:, None],
                                 persistent=False)
            codebooks = codebooks * self.real_codes[..., None]
        register_codebook_state(self, "codebooks", codebooks, ema, kmeans_init)

    @property
    def num_books(self) -> int:
        return self.codebooks.shape[0]

    def extra_repr(self):
        return (f"num_quantizers={self.num_quantizers}, "
                f"num_embeddings={self.level_sizes or self.num_embeddings}, "
                f"embedding_dim={self.embedding_dim}, groups={self.groups}, ema={self.ema}, "
                f"cosine={self.cosine}, code_dim={self.code_dim}, backend={self.backend!r}"
                + (f", ema_size={self.ema_size!r}" if self.ema_size != "smoothed" else "")
                + (f", commitment_levels={self.commitment_levels!r}"
                   if self.commitment_levels != "all" else "")
                + (", level_projections=True" if self.level_projections else "")
                + (f", dead_code_rule='relative', dead_code_every={self.dead_code_every}"
                   if self.dead_code_rule == "relative" else "")
                + (f", level_strides={self.level_strides}" if self.level_strides else ""))

    def _apply(self, fn, recurse=True):
        return keep_fp32(self, self._FP32_STATE if self.ema else (), fn, recurse)

    def _state_options(self):
        return {"num_quantizers": self.num_quantizers, "groups": self.groups,
                **({"num_embeddings": list(self.level_sizes)} if self.level_sizes else {}),
                "shared_codebook": self.shared_codebook, "cosine": self.cosine, "ema": self.ema,
                "codebook_dim": None if self.project_in is None else self.code_dim,
                # (only when not the default: earlier checkpoints hold the smoothed sizes)
                **({"ema_size": self.ema_size} if self.ema_size != "smoothed" else {}),
                **({"level_projections": True} if self.level_projections else {}),
                **({"level_strides": list(self.level_strides)} if self.level_strides else {})}

    def _codebooks(self):
        """The codebooks the lookup sees: the learned ones l2-normalised when ``cosine``."""
        codebooks = self.codebooks.detach() if self.freeze_codebook else self.codebooks
        if self.cosine is True:  # (EMA codebooks are kept unit-norm; loaded or hand-set ones may not be)
            codebooks = F.normalize(codebooks, dim=-1)
        if self.level_sizes is not None:  # padding rows: infinitely far, never chosen
            codebooks = torch.where(self.real_codes[..., None], codebooks, float("inf"))
        return codebooks

    def _prepare(self, inputs, mask):
        """Validate; ``(x [B, D, S], z [B, G*d, S] (projected with codebook_dim; as x when
        the levels project their own), mask [N] or None, backend)``."""
        x = self._vectors_of("inputs", inputs, self.embedding_dim)
        if x.device != self.codebooks.device:
            raise ValueError(f"inputs are on {x.device} but the codebooks are on "
                             f"{self.codebooks.device}; move the module with .to(device)")
        flat_mask = check_mask(mask, x, self._positions(inputs))
        backend = VF.resolve_backend(self.backend, x.device)
        z = self.project_in(x) if self.project_in is not None and not self._by_level else x
        return x, z, flat_mask, backend

    def _search_options(self) -> dict:
        return dict(cosine=self.cosine is True, raw_codes=self.cosine == "search")

    @torch.no_grad()
    def encode(self, inputs: torch.Tensor, mask=None, *, num_levels=None) -> torch.Tensor:
        """Codes only: int64 ``[B, G*n, *spatial]`` for ``inputs [B, D, *spatial]`` (-1 where
        ``mask`` is False): the residual search of the forward's first ``n = num_levels``
        levels per group (default all), in eval mode, with no EMA statistics, state change or
        autograd; levels past ``n`` are not searched. ``decode_indices(encode(x))`` equals
        the eval-mode output."""
        n = self._num_levels(num_levels)
        if self._by_level:
            return self._codes_out(residual_levels.encode(self, inputs, mask, n))
        x, z, flat_mask, backend = self._prepare(inputs, mask)
        idx = residual_codes(z, self._level_codebooks(n), n, groups=self.groups,
                             mask=flat_mask, backend=backend, precision=self.precision,
                             **self._search_options())
        return self._codes_in_layout(idx, inputs)

    def _codes_in_layout(self, idx, inputs):
        return self._codes_out(super()._codes_in_layout(idx, inputs))

    def _codes_out(self, codes):
        """Codes ``[B, G*n, ...]`` in ``codes_layout``."""
        return codes.movedim(1, 0).contiguous() if self.codes_layout == "levels_first" else codes

    def _num_levels(self, num_levels) -> int:
        if num_levels is None:
            return self.num_quantizers
        if not (modules._is_int(num_levels) and 1 <= num_levels <= self.num_quantizers):
            raise ValueError(f"num_levels must be an int in [1, {self.num_quantizers}] "
                             f"(num_quantizers), got {num_levels!r}")
        return int(num_levels)

    def _level_codebooks(self, n: int):
        """The codebooks of each group's first ``n`` levels, ``[G*C', K, d]`` (all of them
        when shared or ``n == Q``)."""
        codebooks = self._codebooks()
        if self.shared_codebook or n == self.num_quantizers:
            return codebooks
        return codebooks.view(self.groups, self.num_quantizers, *codebooks.shape[1:])[
            :, :n].reshape(self.groups * n, *codebooks.shape[1:])

    def _all_levels(self, t, n: int, fill):
        """Per-level ``t [G*n, ...]`` as ``[G*Q, ...]``, the levels past ``n`` ``fill``
        (``None``: left unwritten, for what only the levels that ran read)."""
        if n == self.num_quantizers:
            return t
        shape = (self.groups, self.num_quantizers, *t.shape[1:])
        full = t.new_empty(shape) if fill is None else t.new_full(shape, fill)
        full[:, :n] = t.view(self.groups, n, *t.shape[1:])
        return full.view(self.groups * self.num_quantizers, *t.shape[1:])

    def _plain_search(self, z, active, flat_mask, backend, n=None):
        """The residual search with no codebook loss, rotation or statistics: the codes
        (``encode``) and the commitment terms alone (the loss breakdown), of each group's
        first ``n`` levels (default all)."""
        n = self.num_quantizers if n is None else n
        return residual_quantize(
            z, self._level_codebooks(n), n, groups=self.groups,
            active=active, mask=flat_mask, commitment_cost=self.commitment_cost,
            codebook_loss=False, rotation_trick=False, with_code_sums=False, backend=backend,
            precision=self.precision,
            commit_levels=1 if self.commitment_levels == "first" else None,
            **self._search_options())

    def forward(self, inputs, mask=None, return_loss_breakdown=False, *, num_levels=None):
        n = self._num_levels(num_levels)
        if self._by_level:
            outputs = residual_levels.forward(self, inputs, mask, n, return_loss_breakdown)
            outputs = (outputs[0], outputs[1], outputs[2], self._codes_out(outputs[3]),
                       *outputs[4:])
        else:
            outputs = self._fused_forward(inputs, mask, return_loss_breakdown, n)
        if self.training or self.eval_loss == "commitment":
            return outputs
        zero = outputs[0].new_zeros(())  # eval_loss="zero"
        return (zero, *outputs[1:4], *((LossBreakdown.of(zero),) if len(outputs) > 4 else ()))

    def _fused_forward(self, inputs, mask, return_loss_breakdown, n):
        x, z, flat_mask, backend = self._prepare(inputs, mask)
        update = self.ema and self.training and not self.freeze_codebook
        if self.training and not self._kmeans_done and not self.freeze_codebook:
            self._kmeans(z, flat_mask, backend)
        active = (self._active_levels(x.device, n) if self.training and self.quantize_dropout
                  else None)
        q, loss, idx, perplexity, counts, code_sums, snapshot = residual_quantize(
            z, self._level_codebooks(n), n, groups=self.groups,
            active=active, mask=flat_mask, commitment_cost=self.commitment_cost,
            codebook_loss=not self.ema, rotation_trick=self.rotation_trick,
            with_code_sums=update, backend=backend, precision=self.precision,
            commit_levels=1 if self.commitment_levels == "first" else None,
            **self._search_options())
        if update:  # the statistics of every level (those past n: none) and codebook
            books_on = self._book_active(active if active is not None or n == self.num_quantizers
                                         else torch.full((), n, device=x.device))
            stats = dict(z=z, loss=loss.detach(), idx=self._all_levels(idx, n, -1),
                         counts=self._all_levels(counts, n, 0),
                         # (the EMA update reads the levels that ran only; zeros where
                         # they are summed: over micro-batches, ranks or a shared book)
                         code_sums=self._all_levels(
                             code_sums, n, 0.0 if self._accumulated is not None
                             or self._syncing() or self.shared_codebook else None),
                         snapshot=(snapshot if self.shared_codebook
                                   or self.dead_code_threshold == 0  # (read by re-seeding only)
                                   else self._all_levels(snapshot, n, 0.0)),
                         books_on=books_on, masked=flat_mask is not None, backend=backend)
            if self._accumulated is not None:  # inside accumulate(): sum, update later
                self._accumulate(stats)
            else:
                self._update(**stats)
        # each group's first level (never dropped) tells whether its codebook collapsed
        self._watch_usage(counts.view(self.groups, n, -1)[:, 0])
        if self.project_out is not None:
            q = self.project_out(q)
            if flat_mask is not None:  # masked positions give back their input
                q = torch.where(flat_mask.view(x.shape[0], 1, -1), q, x)
        outputs = (loss, q.to(inputs.dtype).view(inputs.shape), perplexity,
                   self._codes_in_layout(idx, inputs))
        if not return_loss_breakdown:
            return outputs
        if self.ema:
            return (*outputs, LossBreakdown.of(loss, commitment=loss.float()))
        # the commitment terms alone (gradient to the input only): the same levels searched
        # again without the codebook loss (a second pass, only when asked for)
        commitment = self._plain_search(z, active, flat_mask, backend, n)[1]
        return (*outputs, LossBreakdown.of(loss, commitment=commitment.float(),
                                           codebook=(loss - commitment).float()))

    def _active_levels(self, device, levels: int) -> torch.Tensor:
        """Quantize dropout: n uniform in 1..levels, drawn on the device (no host sync);
        rank 0's draw when the statistics are synced."""
        n = torch.randint(1, levels + 1, (), device=device)
        if self._syncing():
            dist.broadcast(n, 0)
        return n

    @torch.no_grad()
    def decode_indices(self, codes: torch.Tensor, *, levels_dim=None) -> torch.Tensor:
        """``codes`` int64 ``[B, G*n, *spatial]`` (the first n <= Q levels of each group, in
        ``[0, K)``, -1 = not quantized; ``[B, *spatial, G*n]`` with ``channel_last``) ->
        ``quantized [B, D, *spatial]`` fp32: the sum of those levels' codes. Other values
        raise ``ValueError``. ``levels_dim=1`` or ``-1`` names the codes' level axis (levels
        last: ``[B, *spatial, G*n]``, as a ``[B, T, Q]`` token tensor); without it, codes
        whose other axis is also ``G*Q`` long (``[B, T, Q]`` with ``T = G*Q``, ...) are
        refused rather than guessed."""
        g, q = self.groups, self.num_quantizers
        check_codes(codes, self.num_embeddings)
        if self.codes_layout == "levels_first" and codes.dim() >= 2:
            codes = codes.movedim(0, 1)
        flat, spatial = self._level_codes(codes, g, q, levels_dim)  # [B, G, n, S]
        n = flat.shape[2]
        if self.level_sizes is not None and codes.numel():
            for level in range(n):
                high = int(flat[:, :, level].max())
                if high >= self.level_sizes[level]:
                    raise ValueError(f"codes of level {level} must lie in [-1, "
                                     f"{self.level_sizes[level] - 1}], got up to {high}")
        if self._by_level:
            return residual_levels.decode(self, flat[:, 0]).view(flat.shape[0], -1, *spatial)
        codebooks = self._codebooks().detach().float()
        out = []
        for group in range(g):
            total = 0
            for level in range(n):
                book = group if self.shared_codebook else group * q + level
                c = flat[:, group, level]
                total = total + torch.where((c >= 0)[..., None], codebooks[book][c.clamp_min(0)], 0.0)
            out.append(total)
        z = torch.cat(out, -1).movedim(-1, 1)  # [B, G*d, S]
        if self.project_out is not None:
            z = self.project_out(z.contiguous())
        return self._channels_first_in_layout(z.reshape(flat.shape[0], -1, *spatial))

