"""The VQ-VAE of van den Oord et al. (ResNet encoder / decoder) on vqfast's quantizers.

Layer for layer the original notebook's ``Model``; its state_dicts (``_encoder.``,
``_pre_vq_conv.``, ``_vq_vae.``, ``_decoder.`` and the notebook's inner names) load as they are.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .modules import VectorQuantizer, VectorQuantizerEMA, rename_legacy_keys
from .multiscale_vq import MultiScaleResidualVQ
from .residual_vq import ResidualVQ


class Residual(nn.Module):
    """``x + Conv1x1(ReLU(Conv3x3(ReLU(x))))``, both convolutions without bias.

    The original notebook used ``nn.ReLU(True)``, whose in-place update also rewrote the skip
    input: its block computes ``ReLU(x) + Conv1x1(...)``. Here the skip carries ``x`` itself,
    as the architecture intends; ``original=True`` computes the notebook's function (without
    the in-place update), for its checkpoints.
    """

    def __init__(self, in_channels, num_hiddens, num_residual_hiddens, original=False):
        super().__init__()
        self.original = bool(original)
        self._block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(in_channels, num_residual_hiddens, kernel_size=3, stride=1, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(num_residual_hiddens, num_hiddens, kernel_size=1, stride=1, bias=False),
        )

    def forward(self, x):
        return (F.relu(x) if self.original else x) + self._block(x)


class ResidualStack(nn.Module):
    """``num_residual_layers`` residual blocks, then a ReLU."""

    def __init__(self, in_channels, num_hiddens, num_residual_layers, num_residual_hiddens,
                 original=False):
        super().__init__()
        self._layers = nn.ModuleList([Residual(in_channels, num_hiddens, num_residual_hiddens,
                                               original)
                                      for _ in range(num_residual_layers)])

    def forward(self, x):
        for layer in self._layers:
            x = layer(x)
        return F.relu(x)


class Encoder(nn.Module):
    """``[B, C, H, W]`` -> ``[B, num_hiddens, H/4, W/4]``: two stride-2 4x4 convs, a 3x3, a residual stack."""

    def __init__(self, in_channels, num_hiddens, num_residual_layers, num_residual_hiddens,
                 original_residual=False):
        super().__init__()
        self._conv_1 = nn.Conv2d(in_channels, num_hiddens // 2, kernel_size=4, stride=2, padding=1)
        self._conv_2 = nn.Conv2d(num_hiddens // 2, num_hiddens, kernel_size=4, stride=2, padding=1)
        self._conv_3 = nn.Conv2d(num_hiddens, num_hiddens, kernel_size=3, stride=1, padding=1)
        self._residual_stack = ResidualStack(num_hiddens, num_hiddens, num_residual_layers,
                                             num_residual_hiddens, original_residual)

    def forward(self, inputs):
        x = F.relu(self._conv_1(inputs))
        x = F.relu(self._conv_2(x))
        return self._residual_stack(self._conv_3(x))


class Decoder(nn.Module):
    """``[B, D, h, w]`` -> ``[B, out_channels, 4h, 4w]``: a 3x3 conv, a residual stack, two stride-2 transposed convs."""

    def __init__(self, in_channels, num_hiddens, num_residual_layers, num_residual_hiddens,
                 out_channels=3, original_residual=False):
        super().__init__()
        self._conv_1 = nn.Conv2d(in_channels, num_hiddens, kernel_size=3, stride=1, padding=1)
        self._residual_stack = ResidualStack(num_hiddens, num_hiddens, num_residual_layers,
                                             num_residual_hiddens, original_residual)
        self._conv_trans_1 = nn.ConvTranspose2d(num_hiddens, num_hiddens // 2, kernel_size=4,
                                                stride=2, padding=1)
        self._conv_trans_2 = nn.ConvTranspose2d(num_hiddens // 2, out_channels, kernel_size=4,
                                                stride=2, padding=1)

    def forward(self, inputs):
        x = self._residual_stack(self._conv_1(inputs))
        x = F.relu(self._conv_trans_1(x))
        return self._conv_trans_2(x)


class VQVAE(nn.Module):
    """VQ-VAE: encoder, 1x1 pre-quantization conv, vector quantizer, decoder.

    Args are the original notebook's, in its order: ``num_hiddens`` (128), ``num_residual_layers`` (2),
    ``num_residual_hiddens`` (32), ``num_embeddings`` K (512), ``embedding_dim`` D (64),
    ``commitment_cost`` (0.25), ``decay``: > 0 picks ``VectorQuantizerEMA``, 0 the plain
    ``VectorQuantizer``. Keyword-only: ``in_channels`` (3), ``epsilon``, and any option of
    the quantizer (``backend``, ``precision``, ``kmeans_init``, ``kmeans_iters``,
    ``dead_code_threshold`` (EMA only), ``cosine``, ``codebook_dim``, ``rotation_trick``,
    ...), passed on as they are. ``num_quantizers=Q`` (keyword) picks ``ResidualVQ`` with
    Q levels (EMA when ``decay > 0``; its options too: ``groups``, ``shared_codebook``,
    ``quantize_dropout``, ...); its codes are ``[B, G*Q, H/4, W/4]``. ``scales=(1, 2, ...)``
    (keyword) picks VAR's ``MultiScaleResidualVQ`` (EMA when ``decay > 0``); its codes are
    ``[B, L]``, every scale's in sequence, and the finest scale must be ``(H/4, W/4)``.
    ``original_residual=True`` (keyword): the residual blocks compute the original
    notebook's function, ``ReLU(x) + block(x)`` (its in-place ReLU rewrote the skip input),
    so a notebook checkpoint reconstructs as the notebook did; the default skips ``x``
    itself, as the architecture intends (the checkpoints load either way; the keys agree).

    ``forward(x: [B, C, H, W])`` returns ``(vq_loss, x_recon, perplexity)``; with
    ``return_codes=True`` also the codes ``int64 [B, H/4, W/4]`` from the same pass.

    The quantizer takes vqfast's defaults, k-means init and dead-code re-seeding, which
    keep the codebook in use (the README's quality table); ``**vqfast.ORIGINAL_ALGORITHM``
    is the paper's algorithm, which collapses it onto a few dozen codes.
    """

    _legacy_keys = {"_encoder.": "encoder.", "_pre_vq_conv.": "pre_vq_conv.",
                    "_vq_vae.": "vq.", "_decoder.": "decoder."}

    def __init__(self, num_hiddens=128, num_residual_layers=2, num_residual_hiddens=32,
                 num_embeddings=512, embedding_dim=64, commitment_cost=0.25, decay=0.0, *,
                 in_channels=3, epsilon=1e-5, num_quantizers=None, scales=None,
                 original_residual=False, **quantizer_options):
        super().__init__()
        self.encoder = Encoder(in_channels, num_hiddens, num_residual_layers, num_residual_hiddens,
                               original_residual)
        self.pre_vq_conv = nn.Conv2d(num_hiddens, embedding_dim, kernel_size=1, stride=1)
        if scales is not None:
            self.vq = MultiScaleResidualVQ(num_embeddings, embedding_dim, scales, commitment_cost,
                                           decay if decay > 0 else 0.99, epsilon, ema=decay > 0,
                                           **quantizer_options)
        elif num_quantizers is not None:
            self.vq = ResidualVQ(num_quantizers, num_embeddings, embedding_dim, commitment_cost,
                                 decay if decay > 0 else 0.99, epsilon, ema=decay > 0,
                                 **quantizer_options)
        elif decay > 0.0:
            self.vq = VectorQuantizerEMA(num_embeddings, embedding_dim, commitment_cost, decay,
                                         epsilon, **quantizer_options)
        else:
            self.vq = VectorQuantizer(num_embeddings, embedding_dim, commitment_cost,
                                      **quantizer_options)
        self.decoder = Decoder(embedding_dim, num_hiddens, num_residual_layers,
                               num_residual_hiddens, out_channels=in_channels,
                               original_residual=original_residual)
        self.in_channels = in_channels

    def _check_images(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected images [B, {self.in_channels}, H, W], got {shape}")
        if x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(f"H and W must be multiples of 4 (two stride-2 stages), got {tuple(x.shape)}")

    def forward(self, x, return_codes: bool = False):
        self._check_images(x)
        z = self.pre_vq_conv(self.encoder(x))
        loss, quantized, perplexity, codes = self.vq(z)
        if return_codes:
            return loss, self.decoder(quantized), perplexity, codes
        return loss, self.decoder(quantized), perplexity

    @torch.no_grad()
    def encode(self, x):
        """Images ``[B, C, H, W]`` -> code indices ``int64 [B, H/4, W/4]`` (``[B, G*Q, H/4,
        W/4]`` for a residual quantizer); no state update."""
        self._check_images(x)
        z = self.pre_vq_conv(self.encoder(x))
        training = self.vq.training
        self.vq.eval()
        try:
            return self.vq(z)[3]
        finally:
            self.vq.train(training)

    @torch.no_grad()
    def decode_indices(self, indices, **options):
        """Code indices ``int64 [B, h, w]`` (``[B, G*Q, h, w]`` for a residual quantizer)
        -> images ``[B, C, 4h, 4w]`` in the decoder's dtype. ``options`` go to the
        quantizer's ``decode_indices`` (``levels_dim`` for a residual one)."""
        if isinstance(self.vq, MultiScaleResidualVQ):  # (it checks [B, L] and the range)
            return self._decode(self.vq.decode_indices(indices, **options))
        residual = isinstance(self.vq, ResidualVQ)
        if indices.dtype != torch.int64 or indices.dim() != 3 + residual:
            shape = "[B, G*Q, h, w]" if residual else "[B, h, w]"
            raise ValueError(f"expected int64 indices {shape}, got {indices.dtype} {tuple(indices.shape)}")
        low = -1 if residual else 0
        if indices.numel() and (int(indices.min()) < low or int(indices.max()) >= self.vq.num_embeddings):
            raise ValueError(f"indices must lie in [{low}, {self.vq.num_embeddings})")
        return self._decode(self.vq.decode_indices(indices, **options))

    def _decode(self, quantized):
        """The decoder of fp32 decoded codes, in the decoder's dtype (a ``.half()`` model)
        and the forward's contiguous layout (a conv's rounding depends on the layout)."""
        return self.decoder(quantized.to(self.pre_vq_conv.weight.dtype,
                                         memory_format=torch.contiguous_format))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        rename_legacy_keys(state_dict, prefix, self._legacy_keys)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
