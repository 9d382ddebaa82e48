"""Drop-in quantizer modules: ``VectorQuantizer`` and ``VectorQuantizerEMA``."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as VF


def rename_legacy_keys(state_dict, prefix: str, renames: dict) -> None:
    """Rewrite ``prefix + old`` keys of ``state_dict`` to ``prefix + new`` in place.

    ``renames`` maps an old key (or key prefix ending in ``.``) to the new one, so a
    checkpoint of the seed notebook (or zalando's pytorch-vq-vae) loads into vqfast.
    """
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix):]
        for old, new in renames.items():
            if local == old or (old.endswith(".") and local.startswith(old)):
                state_dict[prefix + new + local[len(old):]] = state_dict.pop(key)
                break


class _QuantizerBase(nn.Module):
    """Shared input handling: channels-first in, flat ``[N, D]`` through the fused op, back out."""

    _legacy_keys: dict = {}

    def __init__(self, num_embeddings, embedding_dim, commitment_cost, return_onehot, backend,
                 precision):
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"num_embeddings and embedding_dim must be >= 1, got "
                             f"{num_embeddings} and {embedding_dim}")
        if precision not in VF.PRECISIONS:
            raise ValueError(f"precision must be one of {VF.PRECISIONS}, got {precision!r}")
        if backend not in VF.BACKENDS:
            raise ValueError(f"backend must be one of {VF.BACKENDS}, got {backend!r}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = commitment_cost
        self.return_onehot = return_onehot
        self.backend = backend
        self.precision = precision

    def extra_repr(self):
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"commitment_cost={self.commitment_cost}, backend={self.backend!r}")

    def _flatten(self, inputs: torch.Tensor):
        """Validate ``inputs: [B, D, *spatial]`` and return ``x: [N, D]`` (contiguous) and the backend."""
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
        if inputs.dim() < 3:
            raise ValueError(f"inputs must be channels-first [B, D, *spatial] with at least one "
                             f"spatial dim, got shape {tuple(inputs.shape)}")
        if inputs.shape[1] != self.embedding_dim:
            raise ValueError(f"inputs have {inputs.shape[1]} channels (dim 1) but embedding_dim="
                             f"{self.embedding_dim}; shape {tuple(inputs.shape)}")
        VF.check_codebook_input(inputs.movedim(1, -1), self.codebook, name="inputs")
        backend = VF.resolve_backend(self.backend, inputs.device)
        return inputs.movedim(1, -1).reshape(-1, self.embedding_dim).contiguous(), backend

    def nearest(self, x: torch.Tensor):
        """Nearest codes of flat ``x: [N, D]`` -> ``(idx int64 [N], sqdist fp32 [N])``; no state change."""
        return VF.nearest_code(x, self.codebook.detach(), backend=self.backend,
                               precision=self.precision)

    def _outputs(self, inputs, q, loss, idx, counts):
        shape = (inputs.shape[0], *inputs.shape[2:], inputs.shape[1])
        quantized = q.view(shape).movedim(-1, 1).contiguous()
        if self.return_onehot:
            encodings = F.one_hot(idx, self.num_embeddings).float()
        else:
            encodings = idx.view(shape[:-1])
        return loss, quantized, VF.perplexity(counts), encodings

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        rename_legacy_keys(state_dict, prefix, self._legacy_keys)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class VectorQuantizer(_QuantizerBase):
    """Vector quantizer with a learned codebook (van den Oord et al., codebook loss).

    Args:
        num_embeddings: K, the number of codes.
        embedding_dim: D, the channel count of the inputs.
        commitment_cost: beta, the weight of the commitment (encoder) loss.
        return_onehot: return the seed's ``[N, K]`` one-hot as ``encodings`` instead of
            int64 indices shaped ``[B, *spatial]``.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.
        precision: Triton dot precision for fp32 inputs, see ``vqfast.nearest_code``.

    ``forward(inputs: [B, D, *spatial])`` returns ``(loss, quantized, perplexity, encodings)``
    with ``loss = q_latent_loss + commitment_cost * e_latent_loss`` and ``quantized`` the
    straight-through output (value of the nearest codes, gradient of the identity).
    ``codebook`` is an ``nn.Parameter`` ``[K, D]`` initialised ``uniform(-1/K, 1/K)``.
    """

    _legacy_keys = {"_embedding.weight": "codebook"}

    def __init__(self, num_embeddings, embedding_dim, commitment_cost, *, return_onehot=False,
                 backend="auto", precision="ieee"):
        super().__init__(num_embeddings, embedding_dim, commitment_cost, return_onehot, backend,
                         precision)
        self.codebook = nn.Parameter(
            torch.empty(num_embeddings, embedding_dim).uniform_(-1 / num_embeddings, 1 / num_embeddings))

    def forward(self, inputs):
        x, backend = self._flatten(inputs)
        q, loss, idx, counts, _ = VF.quantize(x, self.codebook, self.commitment_cost, True, False,
                                              backend, self.precision)
        return self._outputs(inputs, q, loss, idx, counts)


class VectorQuantizerEMA(_QuantizerBase):
    """Vector quantizer whose codebook follows an exponential moving average of its inputs.

    Args:
        num_embeddings, embedding_dim, commitment_cost: as for ``VectorQuantizer``.
        decay: EMA decay of the cluster sizes and sums (0.99 in the paper).
        epsilon: Laplace smoothing of the cluster sizes.
        return_onehot, backend, precision: as for ``VectorQuantizer``.

    Buffers (no optimizer touches them): ``codebook [K, D]`` (init ``normal(0, 1)``),
    ``ema_cluster_size [K]`` and ``ema_weight [K, D]``, all fp32, updated in place in
    training mode only, after the output was taken from the old codebook.
    ``loss = commitment_cost * e_latent_loss``.

    Non-finite inputs in training mode raise ``ValueError`` before any state changes, so a
    NaN batch can never poison the EMA state (in eval mode nothing is updated and the
    check is skipped).
    """

    _legacy_keys = {"_embedding.weight": "codebook", "_ema_w": "ema_weight",
                    "_ema_cluster_size": "ema_cluster_size"}

    def __init__(self, num_embeddings, embedding_dim, commitment_cost, decay=0.99, epsilon=1e-5, *,
                 return_onehot=False, backend="auto", precision="ieee"):
        super().__init__(num_embeddings, embedding_dim, commitment_cost, return_onehot, backend,
                         precision)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if not epsilon > 0.0 or not math.isfinite(epsilon):
            raise ValueError(f"epsilon must be a positive finite number, got {epsilon}")
        self.decay = decay
        self.epsilon = epsilon
        self.register_buffer("codebook", torch.randn(num_embeddings, embedding_dim))
        self.register_buffer("ema_cluster_size", torch.zeros(num_embeddings))
        self.register_buffer("ema_weight", torch.randn(num_embeddings, embedding_dim))

    def extra_repr(self):
        return f"{super().extra_repr()}, decay={self.decay}, epsilon={self.epsilon}"

    def forward(self, inputs):
        x, backend = self._flatten(inputs)
        update = self.training
        if update and not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
            raise ValueError("inputs contain NaN or Inf; the EMA state was left unchanged")
        q, loss, idx, counts, code_sums = VF.quantize(
            x, self.codebook, self.commitment_cost, False, update, backend, self.precision)
        if update:
            VF.ema_update(counts, code_sums, self.ema_cluster_size, self.ema_weight, self.codebook,
                          self.decay, self.epsilon, backend)
        return self._outputs(inputs, q, loss, idx, counts)
