"""The contract every vqfast quantizer module shares (``QuantizerCommon``) and the
checks and small types the modules use alike."""

import contextlib
import math
import numbers
import warnings
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import functional as VF


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class LossBreakdown(NamedTuple):
    """The terms of a quantizer's loss (``forward(..., return_loss_breakdown=True)``), 0-d
    fp32 tensors that sum to the loss, each with its own gradient (for logging, or for
    weighting the terms differently):

    - ``commitment``: ``commitment_cost * mse(x, sg(q))``, the encoder's pull towards its
      codes (gradient to the input only);
    - ``codebook``: ``mse(sg(x), q)``, the learned codebook's pull towards the inputs
      (gradient to the codebook only; 0 for EMA codebooks);
    - ``entropy`` and ``diversity``: LFQ's weighted per-sample entropy and its minus
      ``diversity_gamma`` times the codebook entropy (0 elsewhere).
    """

    commitment: torch.Tensor
    codebook: torch.Tensor
    entropy: torch.Tensor
    diversity: torch.Tensor

    @classmethod
    def of(cls, like: torch.Tensor, commitment=None, codebook=None, entropy=None, diversity=None):
        zero = like.new_zeros((), dtype=torch.float32)
        return cls(*(zero if t is None else t for t in (commitment, codebook, entropy, diversity)))


class CodebookUsage(NamedTuple):
    """What ``codebook_usage()`` reports.

    ``usage [K]``: each code's share of the EMA cluster sizes (sums to 1);
    ``dead_codes``: codes whose bias-corrected EMA cluster size (see ``VectorQuantizerEMA``)
    is below the threshold; ``alive_codes``: ``K - dead_codes``;
    ``reseeded_codes``: codes re-seeded by ``dead_code_threshold`` since construction;
    ``skipped_batches``: training batches whose EMA update was skipped because their
    statistics (or squared errors) were not finite.
    """
    usage: torch.Tensor
    dead_codes: int
    alive_codes: int = 0
    reseeded_codes: int = 0
    skipped_batches: int = 0

    def __repr__(self):
        top = float(self.usage.max()) if self.usage.numel() else 0.0
        return (f"CodebookUsage({self.alive_codes} of {self.usage.shape[-1]} codes alive, "
                f"{self.dead_codes} dead, largest share {top:.1%}, "
                f"{self.reseeded_codes} re-seeded, {self.skipped_batches} batches skipped)")


def rename_legacy_keys(state_dict, prefix: str, renames: dict) -> None:
    """Rewrite ``prefix + old`` keys of ``state_dict`` to ``prefix + new`` in place.

    ``renames`` maps an old key (or key prefix ending in ``.``) to the new one, so a
    checkpoint of the original notebook (zalando's pytorch-vq-vae) loads into vqfast.
    """
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix):]
        for old, new in renames.items():
            if local == old or (old.endswith(".") and local.startswith(old)):
                state_dict[prefix + new + local[len(old):]] = state_dict.pop(key)
                break


def check_mask(mask, x: torch.Tensor, positions):
    """``mask`` bool of the inputs' ``positions`` shape (``[B, *spatial]``; True = a real
    position) -> contiguous ``[N]`` in the rows' order of ``x: [B, D, S]``; ``None`` stays
    ``None``."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    expected = tuple(positions)
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask must have shape [B, *spatial] = {list(expected)}, got "
                         f"{list(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but the inputs are on {x.device}")
    return mask.reshape(-1).contiguous()


def real_rows(rows: torch.Tensor, flat_mask) -> torch.Tensor:
    """``rows [N, d]`` with each masked row replaced by a real one (for k-means), the real
    rows taken in turn: same shape, so no data-dependent shapes and no host sync, and no
    random draw, so an all-True mask gives exactly what no mask gives."""
    if flat_mask is None:
        return rows
    real_first = torch.argsort((~flat_mask).int(), stable=True)
    n_real = flat_mask.sum().clamp_min(1)
    stand_in = real_first[torch.arange(rows.shape[0], device=rows.device) % n_real]
    return torch.where(flat_mask[:, None], rows, rows[stand_in])


def check_codes(codes: torch.Tensor, num_codes: int, dropped_ok: bool = True) -> None:
    """Codes for ``decode_indices``: an integer tensor in ``[0, num_codes)`` (or -1, "not
    quantized", where ``dropped_ok``). Reads the range on the host (decoding is no
    training step)."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor (int64), got {codes.dtype}")
    if codes.numel():
        low, high = (int(v) for v in torch.aminmax(codes))
        floor = -1 if dropped_ok else 0
        if low < floor or high >= num_codes:
            raise ValueError(f"codes must lie in [{floor}, {num_codes - 1}]"
                             f"{' (-1: not quantized)' if dropped_ok else ''}, got values in "
                             f"[{low}, {high}]")


class CollapseWatch:
    """Warns once when training has used at most ``share`` of the codes (of any codebook)
    for ``steps`` steps in a row: the codebook has collapsed.

    No host sync in the step: the streak is counted on the device, copied to the host
    without blocking, and read one step later once the copy has landed (a CUDA event tells);
    under ``torch.compile`` it does nothing."""

    def __init__(self, steps: int, share: float = 0.02):
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"warn_on_collapse: steps must be an int >= 1, got {steps!r}")
        check_number("warn_on_collapse: share", share, above=True, high=1.0)
        self.steps, self.share, self.warned = steps, share, False
        self.streak = self.host = self.ready = None

    def update(self, used_codes, num_codes: int, owner: str) -> None:
        """``used_codes()``: 0-d, the fewest codes any codebook used in this training step,
        of its ``num_codes`` (called only while watching)."""
        if self.warned or torch.compiler.is_compiling():
            return
        if self.host is not None and (self.ready is None or self.ready.query()):
            streak = int(self.host.numpy())  # a host copy: reading it waits for nothing
            if streak >= self.steps:
                self.warned = True
                warnings.warn(f"{owner}: for {streak} training steps in a row at most "
                              f"{self.share:.0%} of the {num_codes} codes were used: the "
                              f"codebook has collapsed onto a few codes. k-means init and "
                              f"dead-code re-seeding (the defaults) keep it in use (README: "
                              f"Training quality).", stacklevel=4)
                return
        used = used_codes()
        low = used <= self.share * num_codes
        previous = self.streak if self.streak is not None else torch.zeros_like(used)
        self.streak = torch.where(low, previous + 1, 0)
        self.host = self.streak.to("cpu", non_blocking=True)
        self.ready = None
        if self.streak.is_cuda:
            self.ready = torch.cuda.Event()
            self.ready.record()


class QuantizerCommon:
    """What every quantizer module shares.

    ``warn_on_collapse(steps)``: opt in to a warning (once) when training has used at most
    2% of the codes for ``steps`` steps in a row (``CollapseWatch``: no host sync).

    The options that change what a state's tensors mean travel in its ``state_dict``
    (``_extra_state``); loading a state into a module built otherwise (cosine into
    euclidean, other levels or groups, another quantizer class) raises ``ValueError``
    naming both, before any tensor is copied. Checkpoints without them (the original
    notebook's, vqfast 0.2's) load as before.

    The contract of a subclass (an ``nn.Module`` too, listed first in no particular order):

    - ``channel_last`` (bool attribute): the inputs' layout, read by ``_vectors_of``,
      ``_positions``, ``_codes_in_layout`` and the other layout helpers;
    - ``_state_options() -> dict``: the options that change what its state's tensors mean
      (JSON-able; a key left out when at its default keeps older checkpoints loading);
    - ``_update(**stats)`` if it has ``accumulate()``: applies the statistics that
      ``_accumulation_window`` summed;
    - ``kmeans_init`` (attribute, if it has k-means init) and, when on, an ``initialized``
      buffer and a ``_kmeans_done`` attribute (what loading a state sets from it).
    Everything else (codebooks, losses, kernels) is its own."""

    _collapse_watch = None
    _accumulated = None  # inside accumulate(): the summed statistics, ``_update``'s kwargs

    @contextlib.contextmanager
    def _accumulation_window(self):
        """The ``accumulate()`` block of the EMA quantizers: the forwards inside it sum
        into ``_accumulated`` (``_accumulate``); leaving it calls ``_update(**pending)``."""
        if self._accumulated is not None:
            raise RuntimeError("accumulate() blocks do not nest")
        self._accumulated = {}
        try:
            yield self
            pending = self._accumulated
        finally:
            self._accumulated = None
        if pending:
            self._update(**pending)

    #: ``[B, *spatial, D]`` inputs and outputs instead of ``[B, D, *spatial]`` (read in place)
    channel_last = False

    def _vectors_of(self, name: str, inputs, channels: int) -> torch.Tensor:
        """Validated inputs as contiguous ``[B, C, S]`` (channel-last: ``[N, C, 1]``, the
        rows, which is that layout with ``S = 1``); a view when already contiguous."""
        check = VF.channels_last if self.channel_last else VF.channels_first
        return check(name, inputs, channels)

    def _positions(self, inputs: torch.Tensor) -> tuple:
        """The shape of the inputs' vector positions: codes and masks have it."""
        if self.channel_last:
            return tuple(inputs.shape[:-1])
        return (inputs.shape[0], *inputs.shape[2:])

    def _rows_in_layout(self, rows: torch.Tensor) -> torch.Tensor:
        """Decoded codes ``[*positions, C]`` in the inputs' layout."""
        return rows if self.channel_last else rows.movedim(-1, 1)

    def _codes_in_layout(self, idx: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Per-level codes ``idx [L, N]`` -> ``[B, L, *spatial]`` (channel-last ``[B,
        *spatial, L]``)."""
        positions = self._positions(inputs)
        if self.channel_last:
            return idx.t().contiguous().view(*positions, idx.shape[0])
        return idx.view(idx.shape[0], *positions).movedim(0, 1).contiguous()

    def _level_codes(self, codes: torch.Tensor, groups: int, num_levels: int, levels_dim=None):
        """``decode_indices``' per-level codes -> ``([B, G, n, S], spatial)`` (the first ``n
        <= num_levels`` levels of each group, and the positions' spatial shape); raises on
        another shape. ``levels_dim``: the codes' level axis, 1 (``[B, G*n, *spatial]``) or
        -1 (``[B, *spatial, G*n]``); ``None``: the inputs' layout, refused where the other
        axis of codes with spatial dims also holds ``G*Q`` entries (either layout fits)."""
        if levels_dim not in (None, 1, -1):
            raise ValueError(f"levels_dim must be 1, -1 or None, got {levels_dim!r}")
        if levels_dim is None:
            levels_dim = -1 if self.channel_last else 1
            other = -levels_dim
            if codes.dim() >= 3 and codes.shape[other] == groups * num_levels:
                raise ValueError(
                    f"codes of shape {tuple(codes.shape)} could hold the levels on axis 1 "
                    f"([B, G*n, *spatial]) or on the last axis ([B, *spatial, G*n]), both "
                    f"{groups * num_levels} long: say which with levels_dim=1 or levels_dim=-1")
        if levels_dim == -1 and codes.dim() >= 2:  # [B, *spatial, G*n] -> [B, G*n, *spatial]
            codes = codes.movedim(-1, 1)
        if codes.dim() < 2 or codes.shape[1] % groups or codes.shape[1] // groups > num_levels:
            raise ValueError(f"codes must be [B, G*n, *spatial] with G={groups} and n <= "
                             f"{num_levels}, got shape {tuple(codes.shape)}")
        flat = codes.reshape(codes.shape[0], groups, codes.shape[1] // groups, -1)
        return flat, tuple(codes.shape[2:])

    def _channels_first_in_layout(self, t: torch.Tensor) -> torch.Tensor:
        """Decoded codes ``[B, C, *spatial]`` in the inputs' layout."""
        return t.movedim(1, -1) if self.channel_last else t

    def _state_options(self) -> dict:
        raise NotImplementedError

    def warn_on_collapse(self, steps: int = 500, share: float = 0.02):
        """Warn once when training has used at most ``share`` of the codes (of any codebook)
        for ``steps`` training steps in a row. Returns the module."""
        self._collapse_watch = CollapseWatch(steps, share)
        return self

    def _watch_usage(self, counts: torch.Tensor) -> None:
        """The collapse watch of a training step's code counts ``[..., K]``."""
        if self._collapse_watch is not None and self.training:
            self._collapse_watch.update(lambda: (counts > 0).sum(-1).min(), counts.shape[-1],
                                        type(self).__name__)

    def _watch_codes(self, codes: torch.Tensor, num_codes: int) -> None:
        """The collapse watch of codebooks too large to count (FSQ's, LFQ's): a training
        step's codes ``[C, N]`` (C codebooks; -1 = none), their distinct values counted by
        sorting, on the device."""
        if self._collapse_watch is not None and self.training:
            def used_codes():
                ordered = codes.sort(-1).values
                first = torch.ones_like(ordered, dtype=torch.bool)  # first of its value
                first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
                return (first & (ordered >= 0)).sum(-1).min()
            self._collapse_watch.update(used_codes, num_codes, type(self).__name__)

    def get_extra_state(self):
        return {"quantizer": type(self).__name__, **self._state_options()}

    def set_extra_state(self, state):
        pass  # checked in _load_from_state_dict, before anything is copied

    def cuda(self, device=None):
        if not torch.cuda.is_available():
            raise RuntimeError(f"{type(self).__name__}.cuda(): this torch ({torch.__version__}) "
                               f"sees no CUDA device; the quantizer runs on the CPU as it is "
                               f"(backend='auto' takes the torch path there)")
        return super().cuda(device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Reached through super() from the classes' own overrides, after they have only
        # edited ``state_dict`` (legacy names, defaults): still before any tensor is copied.
        self._check_state_options(state_dict, prefix)
        kmeans_init = getattr(self, "kmeans_init", None)
        if kmeans_init:  # a codebook loaded from a checkpoint without the flag is a trained one
            state_dict.setdefault(prefix + "initialized", torch.tensor(True))
        elif kmeans_init is not None:  # a k-means checkpoint loads into a module without it
            state_dict.pop(prefix + "initialized", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if kmeans_init:
            self._kmeans_done = bool(self.initialized)  # at load time, not in the step

    def _check_state_options(self, state_dict, prefix):
        mine = self.get_extra_state()
        theirs = state_dict.setdefault(prefix + "_extra_state", mine)
        if theirs != mine:
            show = lambda s: f"{s.get('quantizer')}({', '.join(f'{k}={v!r}' for k, v in s.items() if k != 'quantizer')})"  # noqa: E731
            if theirs.get("quantizer") != mine.get("quantizer"):
                fix = (f"it is the state of a {theirs.get('quantizer')}, not of a "
                       f"{mine.get('quantizer')}: load it into a {theirs.get('quantizer')}")
            else:
                differ = ", ".join(f"{k}={theirs.get(k)!r} (this module: {mine.get(k)!r})"
                                   for k in sorted(set(theirs) | set(mine))
                                   if theirs.get(k) != mine.get(k))
                fix = f"build the module with the same options; they differ in {differ}"
            raise ValueError(f"this state_dict{f' (at {prefix!r})' if prefix else ''} was saved from "
                             f"{show(theirs)}, which does not load into {show(mine)}: {fix}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_count(name: str, value, low: int = 1):
    """An int option ``>= low`` (None passes through)."""
    if value is not None and not (_is_int(value) and value >= low):
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_number(name: str, value, low: float = 0.0, *, above: bool = False, high=None):
    """A float option: a finite real ``>= low`` (``> low`` where ``above``; ``<= high`` when
    given). Returns it as it came."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= low if above else value < low) or (high is not None and value > high):
        bound = f"{'>' if above else '>='} {low}" + ("" if high is None else f" and <= {high}")
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


class Projection(nn.Linear):
    """A linear map of the channels of channels-first ``[B, C_in, S]`` -> ``[B, C_out, S]``
    (``codebook_dim``'s projections; no transpose copies): a 1x1 convolution, one kernel
    forward and one backward on a GPU (a broadcast matmul copies the weight per batch
    element and takes ten), except for fp32 on CUDA while cuDNN may use TF32 for
    convolutions (``torch.backends.cudnn.allow_tf32``, on by default), where the matmul
    keeps fp32 (matmuls follow ``torch.backends.cuda.matmul``, fp32 by default)."""

    def forward(self, x):
        weight = self.weight.to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if x.shape[-1] == 1:  # rows [N, C, 1] (channel-last inputs): one GEMM, not N
            return F.linear(x.squeeze(-1), weight, bias).unsqueeze(-1)
        if x.shape[-1] == 0:
            return x.new_empty(x.shape[0], self.out_features, 0)
        if x.is_cuda and x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
            out = torch.matmul(weight, x)
            return out + bias[:, None] if bias is not None else out
        return F.conv1d(x, weight[..., None], bias)


def keep_fp32(module: nn.Module, names, fn, recurse: bool) -> nn.Module:
    """``module._apply(fn)`` that moves the fp32 buffers ``names`` without rounding them
    (``.half()`` / ``.to(dtype)`` must not round EMA state)."""
    before = {name: module._buffers[name] for name in names}
    nn.Module._apply(module, fn, recurse)
    for name, old in before.items():
        new = module._buffers[name]
        if new.dtype != old.dtype:
            module._buffers[name] = old.to(new.device)
    return module
