"""Codebook upkeep shared by the codebook quantizers: k-means init, dead-code re-seeding,
the EMA statistics' all-reduce, usage reports."""

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import _torch
from . import functional as VF
from . import quantizer_base as base
from .ops.vq import _quantize_op
from .quantizer_base import CodebookUsage, real_rows


@torch.no_grad()
def kmeans(x: torch.Tensor, num_codes: int, iters: int = 10, backend: str = "auto",
           precision: str = "ieee"):
    """Lloyd's k-means of ``x: [N, D]`` on the fused nearest-code path.

    Starts from ``num_codes`` random rows (with replacement when ``N < num_codes``); a code
    that loses all its rows keeps its position. Returns ``centroids`` (fp32 ``[K, D]``) and
    the last assignment's ``counts`` (int32 ``[K]``).
    """
    x = x.detach().float().contiguous()
    backend = VF.resolve_backend(backend, x.device)
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
        raise ValueError("k-means input contains NaN or Inf")
    n = x.shape[0]
    start = (torch.randint(n, (num_codes,), device=x.device) if n < num_codes
             else torch.randperm(n, device=x.device)[:num_codes])
    centroids = x[start]
    counts = torch.zeros(num_codes, dtype=torch.int32, device=x.device)
    for _ in range(iters):
        # One fused pass: assignment, per-code counts and per-code sums.
        _, _, _, _, counts, sums, _ = _quantize_op(x, centroids, True, 1.0, backend, precision)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
    return centroids, counts


def rows_seen(counts: torch.Tensor, flat_mask, active=None):
    """Which codebooks an EMA update applies to: with a mask, only those that quantized at
    least one real row this step (``counts [..., K]`` summed on the device), so a batch of
    padding alone leaves the state as it is (the Laplace smoothing of an all-zero state
    would divide by zero); combined with ``active`` (bool ``[C]`` or ``None``)."""
    if flat_mask is None:
        return active
    seen = counts.sum(-1) > 0
    return seen if active is None else active & seen


def without_real_rows_nan(centroids: torch.Tensor, flat_mask) -> torch.Tensor:
    """k-means centroids, or NaN when the batch had no real row (padding only): the
    initialisation is then not taken, on every rank alike (rank 0's centroids travel)."""
    if flat_mask is None:
        return centroids
    return torch.where(flat_mask.any(), centroids, float("nan"))


def check_codebook_options(*, ema: bool, decay: float, epsilon: float, dead_code_threshold,
                           default_threshold: float, precision: str, backend: str) -> float:
    """The EMA, re-seeding, precision and backend options of a codebook quantizer, checked
    before anything is built; returns the dead-code threshold (``None``: the default)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if not epsilon > 0.0 or not math.isfinite(epsilon):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon}")
    if dead_code_threshold is None:
        dead_code_threshold = default_threshold
    if not (dead_code_threshold >= 0.0 and math.isfinite(dead_code_threshold)):
        raise ValueError(f"dead_code_threshold must be a finite number >= 0, got "
                         f"{dead_code_threshold}")
    if dead_code_threshold > 0 and not ema:
        raise ValueError("dead_code_threshold needs ema=True (it reads the EMA cluster sizes)")
    if precision not in VF.PRECISIONS:
        raise ValueError(f"precision must be one of {VF.PRECISIONS}, got {precision!r}")
    VF.check_backend(backend)
    return dead_code_threshold


def adopt_kmeans(module: nn.Module, codebook: torch.Tensor, centroids: torch.Tensor,
                 sizes: torch.Tensor, raw: bool = False) -> None:
    """Rank 0's k-means codes (``centroids``, cluster ``sizes`` at least 1) on every rank,
    taken only where all are finite: the ``codebook``, the EMA state that agrees with them
    (``raw``: encodec's, see ``take_kmeans_ema_state``), and the module's ``initialized``
    flag (no host read inside a compiled graph)."""
    if base._world_size() > 1:
        dist.broadcast(centroids, 0)
        dist.broadcast(sizes, 0)
    finite = torch.isfinite(centroids).all()
    codebook.data.copy_(torch.where(finite, centroids, codebook.data))
    if getattr(module, "ema_cluster_size", None) is not None:
        take_kmeans_ema_state(module, centroids, sizes, finite, raw)
    module.initialized.copy_(finite)
    module._kmeans_done = kmeans_done(finite)


@torch.no_grad()
def reseed_dead_codes(module: nn.Module, x: torch.Tensor, apply: torch.Tensor, flat_mask=None,
                      cosine: bool = False) -> None:
    """Re-seed ``module``'s one codebook in place: codes whose ``corrected_cluster_size()``
    is below its ``dead_code_threshold`` (where ``apply``) take a random row of ``x [B, D,
    S]`` (rank 0's when ``module._syncing()``; never a row ``flat_mask`` leaves out),
    starting at a size of ``max(dead_code_threshold, 1)``. Branch-free: every code draws a
    candidate row; the dead ones take it. No host sync."""
    dead = (module.corrected_cluster_size() < module.dead_code_threshold) & apply
    picks, samples = _torch.random_rows(x, module.num_embeddings)  # [K], [K, D]
    if cosine:
        samples = F.normalize(samples, dim=-1)
    real = flat_mask[picks] if flat_mask is not None else None  # a masked row is no candidate
    if module._syncing():  # synced state: the same dead codes everywhere, rank 0's rows
        dist.broadcast(samples, 0)
        if real is not None:
            dist.broadcast(real, 0)
    if real is not None:
        dead = dead & real
    _torch.take_samples(dead, samples, max(module.dead_code_threshold, 1.0) * module.ema_decay_weight,
                        module.codebook, module._buffers.get("ema_weight"),
                        module.ema_cluster_size, module.reseeded_codes)


def kmeans_done(initialized: torch.Tensor) -> bool:
    """Whether k-means init is over: eagerly, whether it took (else the next training batch
    tries again; one host read, on the steps before it took); inside a compiled graph,
    always (no host read there: a batch that could not initialise leaves the codebook)."""
    return True if torch.compiler.is_compiling() else bool(initialized)


def take_kmeans_ema_state(module: nn.Module, centroids: torch.Tensor, sizes: torch.Tensor,
                          finite: torch.Tensor, raw: bool = False) -> None:
    """EMA state that agrees with k-means codes (``centroids [..., K, d]``, ``sizes [..., K]``
    at least 1), taken only where ``finite``: ``ema_cluster_size = sizes``, ``ema_weight =
    centroids * sizes``, ``ema_decay_weight = 1`` (trained-state bias correction). ``raw``
    (encodec's convention): ``sizes`` as counted (0 allowed) and ``ema_weight = centroids``."""
    module.ema_cluster_size.copy_(torch.where(finite, sizes, module.ema_cluster_size))
    if getattr(module, "ema_weight", None) is not None:  # (a learned codebook tracks usage only)
        weight = centroids if raw else centroids * sizes[..., None]
        module.ema_weight.copy_(torch.where(finite, weight, module.ema_weight))
    module.ema_decay_weight.copy_(torch.where(finite, 1.0, module.ema_decay_weight))


def _all_reduce_statistics(counts: torch.Tensor, code_sums: torch.Tensor,
                           not_finite: torch.Tensor):
    """Sum per-code counts (int32 ``[..., K]``), sums (fp32 ``[..., K, D]``: every level's)
    and the 0-d non-finite flag over all ranks in one collective (so every rank skips the
    same batches). Counts travel as fp32: exact up to 2**24 vectors per code per step."""
    sums, num = code_sums.numel(), counts.numel()
    packed = torch.cat([code_sums.reshape(-1), counts.float().reshape(-1),
                        not_finite.float().reshape(1)])
    dist.all_reduce(packed)
    return (packed[sums:sums + num].round().to(torch.int32).view(counts.shape),
            packed[:sums].view(code_sums.shape), packed[-1] > 0)


def usage_report(cluster_size, corrected_size, threshold, reseeded, skipped) -> CodebookUsage:
    """A ``CodebookUsage`` of one codebook's EMA sizes ``[K]`` (host sync)."""
    size = cluster_size.float()
    total = size.sum()
    usage = size / total if total > 0 else torch.full_like(size, 1.0 / size.numel())
    dead = int((corrected_size < threshold).sum())
    return CodebookUsage(usage, dead, size.numel() - dead, int(reseeded), int(skipped))


def warn_skipped(skipped: int) -> None:
    if skipped:
        warnings.warn(f"{skipped} training batch(es) had non-finite statistics (NaN/Inf "
                      "inputs or overflowing squares); their EMA updates were skipped",
                      RuntimeWarning, stacklevel=3)


def register_reseed_key(module) -> None:
    """The fused re-seeding's state, not saved: its Philox key ``_reseed_key`` (int64
    ``[1]``, advanced on the device; from torch's seed, so ``torch.manual_seed`` fixes it,
    without a random draw)."""
    module.register_buffer("_reseed_key", torch.tensor([torch.initial_seed() % 2**62]),
                           persistent=False)


def register_codebook_state(module, name: str, codebooks: torch.Tensor, ema: bool,
                            kmeans_init: bool) -> None:
    """A codebook quantizer's state, in one order for every family: ``codebooks [*lead, K,
    d]`` as the buffer ``name`` with the EMA statistics (``ema_cluster_size [*lead, K]``,
    ``ema_weight``, ``ema_decay_weight``, the ``reseeded_codes`` and ``skipped_batches``
    counters ``[*lead]``), or as a learned ``nn.Parameter``; and, with k-means init, the
    ``initialized`` flag (persistent: a checkpoint after the k-means step is not
    re-initialised) beside its Python twin ``_kmeans_done``."""
    if ema:
        lead = codebooks.shape[:-2]
        module.register_buffer(name, codebooks)
        module.register_buffer("ema_cluster_size", torch.zeros(codebooks.shape[:-1]))
        module.register_buffer("ema_weight", codebooks.clone())
        module.register_buffer("ema_decay_weight", torch.zeros(lead))
        module.register_buffer("reseeded_codes", torch.zeros(lead, dtype=torch.int64))
        module.register_buffer("skipped_batches", torch.zeros(lead, dtype=torch.int64))
    else:
        setattr(module, name, nn.Parameter(codebooks))
    module._kmeans_done = not kmeans_init
    if kmeans_init:
        module.register_buffer("initialized", torch.tensor(False))


class SingleCodebookUpkeep:
    """The single-codebook quantizers' upkeep (a mixin of ``VectorQuantizer`` and
    ``VectorQuantizerEMA``): k-means init of ``codebook``, the usage buffers and their
    defaults for older checkpoints, dead-code re-seeding. Needs ``num_embeddings``,
    ``kmeans_iters``, ``precision``, ``cosine`` and ``codebook``."""

    @torch.no_grad()
    def _kmeans_init(self, x: torch.Tensor, backend: str, flat_mask=None) -> None:
        rows = real_rows(x.movedim(1, -1).reshape(-1, x.shape[1]).float(), flat_mask)
        if self.cosine:
            rows = F.normalize(rows, dim=-1)
        centroids, counts = kmeans(rows, self.num_embeddings, self.kmeans_iters, backend, self.precision)
        if self.cosine:
            centroids = F.normalize(centroids, dim=-1)
        centroids = without_real_rows_nan(centroids, flat_mask)
        adopt_kmeans(self, self.codebook, centroids, counts.float().clamp_min(1))

    def _syncing(self) -> bool:
        return base._world_size() > 1

    def corrected_cluster_size(self) -> torch.Tensor:
        """``[K]`` EMA cluster sizes divided by ``1 - decay**t`` (Adam's bias correction):
        after one step, each code's count in that batch, not 1% of it."""
        return self.ema_cluster_size / self.ema_decay_weight.clamp_min(1e-30)

    @torch.no_grad()
    def _reseed_dead_codes(self, x: torch.Tensor, apply: torch.Tensor, flat_mask=None) -> None:
        reseed_dead_codes(self, x, apply, flat_mask, self.cosine)

    def _register_usage_state(self, ema_weight=None):
        """The EMA statistics buffers (fp32): ``ema_cluster_size [K]`` (and ``ema_weight
        [K, d]`` when given), ``ema_decay_weight`` and the ``reseeded_codes`` counter."""
        self.register_buffer("ema_cluster_size", torch.zeros(self.num_embeddings))
        if ema_weight is not None:
            self.register_buffer("ema_weight", ema_weight)
        self.register_buffer("ema_decay_weight", torch.tensor(0.0))
        self.register_buffer("reseeded_codes", torch.tensor(0, dtype=torch.int64))
        register_reseed_key(self)

    @staticmethod
    def _default_trained_state(state_dict, prefix, num_embeddings):
        """Checkpoints from before the usage buffers (the notebook's, vqfast 0.2's) hold trained
        state: each code starts as used once per batch."""
        state_dict.setdefault(prefix + "ema_cluster_size", torch.ones(num_embeddings))
        state_dict.setdefault(prefix + "ema_decay_weight", torch.tensor(1.0))
        state_dict.setdefault(prefix + "reseeded_codes", torch.tensor(0, dtype=torch.int64))
