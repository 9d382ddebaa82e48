"""A toy quantizer: each channel rounded to the nearest of ``L`` fixed levels."""

import torch
from torch import nn

from . import functional as VF
from .ops import channel_grid as ops
from .quantizer_base import QuantizerCommon, check_codes


class ChannelGridQuantizer(QuantizerCommon, nn.Module):
    """Each of ``channels`` channels rounded to the nearest of ``num_levels`` levels evenly
    spaced in ``[-1, 1]``. ``forward(z: [B, C, *spatial])`` -> ``(quantized, codes)``:
    ``quantized`` in z's shape and dtype (identity gradient), ``codes`` int64 ``[B,
    *spatial]`` in ``[0, num_levels**channels)``, the first channel least significant."""

    def __init__(self, num_levels: int, channels: int, *, backend="auto"):
        super().__init__()
        VF.check_backend(backend)
        self.num_levels, self.channels, self.backend = num_levels, channels, backend
        self.codebook_size = num_levels ** channels
        levels = torch.linspace(-1, 1, num_levels).repeat(channels, 1)
        self.register_buffer("levels", levels, persistent=False)

    def _state_options(self):
        return {"num_levels": self.num_levels, "channels": self.channels}

    def forward(self, z):
        x = self._vectors_of("z", z, self.channels)
        q, codes = ops.channel_grid(x, self.levels, VF.resolve_backend(self.backend, x.device))
        return q.view(z.shape), codes.view(self._positions(z))

    @torch.no_grad()
    def encode(self, z):
        return self.forward(z)[1]

    @torch.no_grad()
    def decode_indices(self, codes):
        check_codes(codes, self.codebook_size, dropped_ok=False)
        radix = self.num_levels ** torch.arange(self.channels, device=codes.device)
        digits = (codes.unsqueeze(1) // radix.view(1, -1, *[1] * (codes.dim() - 1))) % self.num_levels
        return self.levels[torch.arange(self.channels, device=codes.device).view(1, -1, *[1] * (codes.dim() - 1)), digits]
