"""``ResidualVQ``'s codebook upkeep, apart from its search: the EMA update of every level
from the fused forward's statistics (with gradient accumulation and one packed all-reduce),
dead-code re-seeding (the absolute rule, and moshi's relative one), k-means init level by
level, and the usage reports."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import _torch
from . import functional as VF
from . import quantizer_base
from .codebook_upkeep import (_all_reduce_statistics, adopt_kmeans, kmeans, rows_seen,
                              usage_report, warn_skipped, without_real_rows_nan)
from .ops.residual_vq import residual_reseed
from .quantizer_base import real_rows

_SIZE_RULES = {"smoothed": 0, "raw": 1, "raw_clamped": 2}  # ema_size -> the EMA op's size_rule


class ResidualUpkeep:
    """The EMA, re-seeding, k-means and usage methods of ``ResidualVQ`` (a mixin: it reads
    the module's options and buffers)."""

    def _syncing(self) -> bool:
        wanted = self.sync_distributed is None or bool(self.sync_distributed)
        return self.ema and wanted and quantizer_base._world_size() > 1

    def _book_active(self, active):
        """Per codebook: was it used this batch (bool ``[G*C]``, or None for all)."""
        if active is None or self.shared_codebook:
            return None
        level_on = torch.arange(self.num_quantizers, device=active.device) < active
        return level_on.repeat(self.groups)

    def _per_book(self, t: torch.Tensor) -> torch.Tensor:
        """Per-level statistics ``[G*Q, ...]`` -> per codebook (summed over shared levels)."""
        if not self.shared_codebook:
            return t
        return t.view(self.groups, self.num_quantizers, *t.shape[1:]).sum(1)

    def accumulate(self):
        """Gradient accumulation (``ema=True``): the training forwards inside the block add
        every level's counts and sums to one accumulator; leaving it applies one EMA update
        (one packed all-reduce under ``torch.distributed``), equal up to fp32 rounding to
        one forward of the concatenated micro-batches. A codebook that any micro-batch used
        (quantize dropout, masks) is updated; a non-finite micro-batch skips the update.
        k-means init runs on the first micro-batch, dead-code re-seeding draws from the
        last one's residuals. No host sync.

        ``with rvq.accumulate(): for micro in batches: loss, q, _, _ = rvq(micro); ...``
        """
        return self._accumulation_window()

    def _accumulate(self, stats: dict) -> None:
        acc = self._accumulated
        if acc:
            for key in ("loss", "counts", "code_sums"):
                stats[key] = acc[key] + stats[key]
            on, seen = acc["books_on"], stats["books_on"]
            stats["books_on"] = None if on is None or seen is None else on | seen
            stats["masked"] = acc["masked"] or stats["masked"]
        acc.update(stats)

    @torch.no_grad()
    def _update(self, z, loss, idx, counts, code_sums, snapshot, books_on, masked, backend):
        """The EMA update of every codebook from per-level ``counts`` and ``code_sums``
        (``books_on``: bool ``[G*C]`` of the codebooks the batch used, None for all;
        ``masked``: whether a mask took part), then dead-code re-seeding."""
        counts, code_sums = self._per_book(counts), self._per_book(code_sums)
        not_finite = None
        if self._syncing():
            counts, code_sums, not_finite = _all_reduce_statistics(counts, code_sums,
                                                                   ~torch.isfinite(loss))
        book_active = rows_seen(counts, True if masked else None, books_on)
        if self.dead_code_rule == "relative" and self.dead_code_threshold > 0:
            self._dead_code_countdown -= 1
            if self._dead_code_countdown <= 0:
                self._dead_code_countdown = self.dead_code_every
                finite = torch.isfinite(loss) if not_finite is None else (
                    torch.isfinite(loss) & ~not_finite)
                self._replace_below_mean(z, idx, snapshot, finite, masked)
        applied = VF.ema_update(counts, code_sums, loss, not_finite, self.ema_cluster_size,
                                self.ema_weight, self.codebooks, self.ema_decay_weight,
                                self.skipped_batches, self.decay, self.epsilon, backend,
                                book_active, num_codes=getattr(self, "book_sizes", None),
                                size_rule=_SIZE_RULES[self.ema_size])
        if self.cosine is True:
            self.codebooks.copy_(torch.where(applied[:, None, None] > 0,
                                             F.normalize(self.codebooks, dim=-1), self.codebooks))
        if self.dead_code_threshold > 0 and self.dead_code_rule == "absolute":
            self._reseed_dead_codes(z, idx, snapshot, applied, backend)

    @torch.no_grad()
    def _replace_below_mean(self, z, idx, snapshot, finite, masked):
        """``dead_code_rule="relative"`` (moshi's), before the EMA update: each codebook's
        codes below ``dead_code_threshold`` times its mean stored size take one of the
        residuals their level saw (of real rows only), at the mean size; draws level by
        level, as moshi's. A non-finite batch (``finite`` False) replaces nothing."""
        g, q, d = self.groups, self.num_quantizers, self.code_dim
        size = self.ema_cluster_size
        k = self.num_embeddings
        mean = size.sum(1, keepdim=True) / (self.book_sizes[:, None] if self.level_sizes
                                            else k)
        dead = (size < self.dead_code_threshold * mean) & (idx >= 0).any(1)[:, None] & finite
        if self.level_sizes is not None:
            dead = dead & self.real_codes
        rows = z.movedim(1, -1).reshape(-1, z.shape[1]).float()
        real = idx[0] >= 0 if masked else None  # (level 0 never drops: the mask)
        n = rows.shape[0]
        samples = []
        for group in range(g):
            residual = rows[:, group * d:(group + 1) * d]
            for level in range(q):
                book = group * q + level
                picks = (torch.randperm(n, device=z.device)[:k] if n >= k
                         else torch.randint(0, n, (k,), device=z.device))
                samples.append(real_rows(residual, real)[picks])  # (masked rows: never drawn)
                codes = idx[book]
                residual = residual - torch.where((codes >= 0)[:, None],
                                                  snapshot[book][codes.clamp_min(0)], 0.0)
        samples = torch.stack(samples)
        if self.cosine is True:
            samples = F.normalize(samples, dim=-1)
        if self._syncing():
            dist.broadcast(samples, 0)
        self.ema_weight.copy_(torch.where(dead[..., None], samples * mean[..., None],
                                          self.ema_weight))
        self.ema_cluster_size.copy_(torch.where(dead, mean, size))
        self.codebooks.copy_(torch.where(dead[..., None], samples, self.codebooks))
        self.reseeded_codes.add_(dead.sum(1))

    def corrected_cluster_size(self) -> torch.Tensor:
        """``[G*C, K]`` EMA cluster sizes over ``1 - decay**t`` (see ``VectorQuantizerEMA``)."""
        return self.ema_cluster_size / self.ema_decay_weight.clamp_min(1e-30)[:, None]

    @torch.no_grad()
    def _reseed_dead_codes(self, z, idx, snapshot, applied, backend):
        """The absolute dead-code rule after the EMA update (``applied`` fp32 ``[G*C]``):
        each code takes one row of the batch as its level saw it, the same row for every
        codebook (one launch on the Triton backend; across ranks, rank 0's rows)."""
        k = self.num_embeddings
        picks = torch.randint(idx.shape[1], (k,), device=z.device)
        options = dict(groups=self.groups, num_levels=self.num_quantizers,
                       shared=self.shared_codebook, cosine=self.cosine is True)
        state = (self.ema_cluster_size, self.ema_decay_weight, applied, self.codebooks,
                 self.ema_weight, self.reseeded_codes, getattr(self, "real_codes", None),
                 self.dead_code_threshold)
        if not self._syncing():
            residual_reseed(z, idx, snapshot, picks, *state, **options, backend=backend)
            return
        samples, used = _torch.residual_vq.reseed_samples(z, idx, snapshot, picks, **options)
        dist.broadcast(samples, 0)
        dist.broadcast(used, 0)
        _torch.residual_vq.apply_reseed(samples, used, *state)

    @torch.no_grad()
    def _kmeans(self, z, flat_mask, backend):
        """Level by level: k-means of the residuals the level will see (rank 0's batch)."""
        d = self.code_dim
        rows = z.movedim(1, -1).reshape(-1, z.shape[1]).float()
        rows = real_rows(rows, flat_mask)
        centroids = torch.zeros_like(self.codebooks)  # (padding rows stay 0)
        sizes = torch.zeros(self.codebooks.shape[:2], device=z.device)
        for g in range(self.groups):
            residual = rows[:, g * d:(g + 1) * d]
            for level in range(1 if self.shared_codebook else self.num_quantizers):
                book = g if self.shared_codebook else g * self.num_quantizers + level
                k = self.level_sizes[level] if self.level_sizes else self.num_embeddings
                c, sizes[book, :k] = self._level_kmeans(residual, k, backend)
                centroids[book, :k] = c
                residual = residual - c[self._nearest_centroid(residual, c, backend)]
        centroids = without_real_rows_nan(centroids, flat_mask)
        adopt_kmeans(self, self.codebooks, centroids, sizes, raw=self.kmeans_state == "raw")

    def _level_kmeans(self, rows, k: int, backend):
        """One level's k-means of its residual ``rows [N, d]`` (normalised when ``cosine``):
        ``(centroids [k, d], sizes [k])``, the sizes as ``kmeans_state`` stores them."""
        used = F.normalize(rows, dim=-1) if self.cosine is True else rows
        c, counts = kmeans(used, k, self.kmeans_iters, backend, self.precision)
        if self.cosine is True:
            c = F.normalize(c, dim=-1)
        return c, counts.float() if self.kmeans_state == "raw" else counts.float().clamp_min(1)

    def _nearest_centroid(self, rows, c, backend):
        """``rows [N, d]``' nearest of the centroids ``c`` by the module's search (cosine
        for ``cosine`` True or ``"search"``)."""
        if self.cosine is True:
            rows = F.normalize(rows, dim=-1)
        elif self.cosine == "search":
            rows, c = F.normalize(rows, dim=-1), F.normalize(c, dim=-1)
        return VF.nearest_code(rows, c, backend=backend, precision=self.precision)[0]

    @torch.no_grad()
    def codebook_usage(self, threshold: float | None = None):
        """One ``CodebookUsage`` per codebook (``[G*C]``, level-major within a group) from
        the EMA sizes (host sync); warns if batches were skipped."""
        if not self.ema:
            raise RuntimeError("codebook_usage() reads the EMA cluster sizes: ema=True only")
        if threshold is None:
            threshold = self.dead_code_threshold or 1.0
        corrected = self.corrected_cluster_size()
        sizes = (self.book_sizes.tolist() if self.level_sizes
                 else [self.num_embeddings] * self.num_books)
        reports = [usage_report(self.ema_cluster_size[b, :k], corrected[b, :k], threshold,
                                self.reseeded_codes[b], self.skipped_batches[b])
                   for b, k in enumerate(sizes)]
        warn_skipped(max(r.skipped_batches for r in reports))
        return reports
