"""The original notebook's quantizers, written plainly: the oracle of the single-codebook
quantizers and the benchmark baseline.

This is the algorithm of the original notebook (matmul distances, an ``[N, K]`` one-hot,
a dense ``[K, N] @ [N, D]`` matmul for the EMA sums) with its bugs fixed:

- the nearest code is the ``argmin`` of the distances (the notebook took the ``argmax``);
- the EMA state lives in buffers updated in place (the notebook re-created ``nn.Parameter`` s
  every step, which breaks optimizers, ``state_dict`` identity and device placement);
- low-precision inputs are computed in fp32 and the output is cast back.

Attribute names are the notebook's (``_embedding``, ``_ema_w``, ``_ema_cluster_size``), so
a state_dict of this module is a notebook-layout state_dict. Do not optimise this file.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _flatten(inputs: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """``[B, D, *spatial]`` -> ``[N, D]`` fp32, channels-last first."""
    return inputs.movedim(1, -1).reshape(-1, embedding_dim).float()


def _unflatten(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    shape = (like.shape[0], *like.shape[2:], like.shape[1])
    return flat.view(shape).movedim(-1, 1).contiguous().to(like.dtype)


def nearest_code(flat_input: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """The notebook's distances, ``[N, K]`` materialised, and their argmin (not argmax): int64 ``[N]``."""
    distances = (torch.sum(flat_input**2, dim=1, keepdim=True)
                 + torch.sum(embedding**2, dim=1)
                 - 2 * torch.matmul(flat_input, embedding.t()))
    return torch.argmin(distances, dim=1)


def _encode(flat_input: torch.Tensor, embedding: torch.Tensor):
    encoding_indices = nearest_code(flat_input, embedding).unsqueeze(1)
    encodings = torch.zeros(encoding_indices.shape[0], embedding.shape[0], device=flat_input.device)
    encodings.scatter_(1, encoding_indices, 1)
    quantized = torch.matmul(encodings, embedding)
    return encodings, quantized


def _perplexity(encodings: torch.Tensor) -> torch.Tensor:
    avg_probs = torch.mean(encodings, dim=0)
    return torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-10)))


class VectorQuantizer(nn.Module):
    """The notebook's plain quantizer (codebook loss), ``[N, K]`` matrices and all."""

    def __init__(self, num_embeddings, embedding_dim, commitment_cost):
        super().__init__()
        self._embedding_dim = embedding_dim
        self._num_embeddings = num_embeddings
        self._embedding = nn.Embedding(num_embeddings, embedding_dim)
        self._embedding.weight.data.uniform_(-1 / num_embeddings, 1 / num_embeddings)
        self._commitment_cost = commitment_cost

    def forward(self, inputs):
        flat_input = _flatten(inputs, self._embedding_dim)
        encodings, quantized = _encode(flat_input, self._embedding.weight)

        e_latent_loss = F.mse_loss(quantized.detach(), flat_input)
        q_latent_loss = F.mse_loss(quantized, flat_input.detach())
        loss = q_latent_loss + self._commitment_cost * e_latent_loss

        quantized = flat_input + (quantized - flat_input).detach()
        return loss, _unflatten(quantized, inputs), _perplexity(encodings), encodings


class VectorQuantizerEMA(nn.Module):
    """The notebook's EMA quantizer (no codebook loss), with its state updated in place."""

    def __init__(self, num_embeddings, embedding_dim, commitment_cost, decay, epsilon=1e-5):
        super().__init__()
        self._embedding_dim = embedding_dim
        self._num_embeddings = num_embeddings
        self._embedding = nn.Embedding(num_embeddings, embedding_dim)
        self._embedding.weight.data.normal_()
        self._embedding.weight.requires_grad_(False)
        self._commitment_cost = commitment_cost
        self.register_buffer("_ema_cluster_size", torch.zeros(num_embeddings))
        self.register_buffer("_ema_w", torch.randn(num_embeddings, embedding_dim))
        self._decay = decay
        self._epsilon = epsilon

    def forward(self, inputs):
        flat_input = _flatten(inputs, self._embedding_dim)
        encodings, quantized = _encode(flat_input, self._embedding.weight)

        if self.training:
            with torch.no_grad():
                self._ema_cluster_size.copy_(self._ema_cluster_size * self._decay
                                             + (1 - self._decay) * torch.sum(encodings, 0))
                n = torch.sum(self._ema_cluster_size)
                self._ema_cluster_size.copy_((self._ema_cluster_size + self._epsilon)
                                             / (n + self._num_embeddings * self._epsilon) * n)
                dw = torch.matmul(encodings.t(), flat_input)
                self._ema_w.copy_(self._ema_w * self._decay + (1 - self._decay) * dw)
                self._embedding.weight.copy_(self._ema_w / self._ema_cluster_size.unsqueeze(1))

        e_latent_loss = F.mse_loss(quantized.detach(), flat_input)
        loss = self._commitment_cost * e_latent_loss

        quantized = flat_input + (quantized - flat_input).detach()
        return loss, _unflatten(quantized, inputs), _perplexity(encodings), encodings


def ema_step(cluster_size, ema_weight, counts, code_sums, decay, epsilon, cosine=False):
    """One EMA update of a codebook (the original notebook's formulas): ``cluster_size [K]``,
    ``ema_weight [K, d]`` and this batch's ``counts [K]``, ``code_sums [K, d]`` ->
    ``(cluster_size, ema_weight, codebook)``; the codes re-normalised when ``cosine``."""
    size = cluster_size * decay + (1 - decay) * counts
    n = size.sum()
    size = (size + epsilon) / (n + size.shape[0] * epsilon) * n
    weight = ema_weight * decay + (1 - decay) * code_sums
    codebook = weight / size[:, None]
    return size, weight, F.normalize(codebook, dim=1) if cosine else codebook
