"""``SimVQ``: the codebook as a frozen random basis times one learned linear map (Zhu et
al., 2024), through the fused single-codebook op."""

import torch
from torch import nn

from .modules import LossBreakdown, _QuantizerBase


class SimVQ(_QuantizerBase):
    """Vector quantization with a reparameterised codebook (SimVQ, Zhu et al., 2024).

    The codes are ``codebook = basis @ W^T``: ``basis [K, basis_dim]`` a frozen Gaussian
    (``N(0, 1/basis_dim)``, a buffer saved with the state) and ``W`` the learned
    ``code_transform`` (``nn.Linear(basis_dim, D, bias=False)``). Every code moves with
    ``W``, so a code no vector picks still follows the data: the paper reports the codebook
    stays in use without k-means, EMA or re-seeding.

    Args:
        num_embeddings: K. embedding_dim: D.
        commitment_cost: beta: ``loss = mse(q, sg(x)) + beta * mse(sg(q), x)`` (the
            codebook term trains ``W``).
        basis_dim: the frozen basis' width (default D).
        rotation_trick, channel_last, freeze_codebook (no gradient to ``W``), backend,
            precision: as for ``VectorQuantizer``.

    ``forward(inputs: [B, D, *spatial], mask=None, return_loss_breakdown=False)`` returns
    ``(loss, quantized, perplexity, codes)`` as ``VectorQuantizer`` does. The projected
    codebook is computed once per step (one ``[K, basis_dim] x [basis_dim, D]`` matmul)
    and the fused op takes it as its codebook; its gradient reaches ``W`` through autograd.
    ``codebook`` (property) is that projection; ``encode`` / ``decode_indices`` as usual.
    """

    def __init__(self, num_embeddings, embedding_dim, commitment_cost=0.25, *, basis_dim=None,
                 rotation_trick=False, backend="auto", precision="ieee", freeze_codebook=False,
                 channel_last=False):
        super().__init__(num_embeddings, embedding_dim, commitment_cost, False, backend,
                         precision, False, 0, rotation_trick=rotation_trick,
                         channel_last=channel_last)
        if basis_dim is not None and (not isinstance(basis_dim, int) or basis_dim < 1):
            raise ValueError(f"basis_dim must be an int >= 1, got {basis_dim!r}")
        self.freeze_codebook = freeze_codebook
        self.basis_dim = basis_dim or embedding_dim
        self.register_buffer("basis", torch.randn(num_embeddings, self.basis_dim)
                             * self.basis_dim ** -0.5)
        self.code_transform = nn.Linear(self.basis_dim, embedding_dim, bias=False)

    @property
    def codebook(self) -> torch.Tensor:
        """``[K, D]``: the frozen basis through the learned map (differentiable)."""
        return self.code_transform(self.basis.to(self.code_transform.weight.dtype))

    def _device(self) -> torch.device:
        return self.basis.device

    def _state_options(self):
        return {**super()._state_options(), "basis_dim": self.basis_dim}

    def extra_repr(self):
        return f"{super().extra_repr()}, basis_dim={self.basis_dim}"

    def forward(self, inputs, mask=None, return_loss_breakdown=False):
        x, z, flat_mask, backend = self._prepare(inputs, mask)
        codebook = self.codebook  # once per step; the op streams it like any codebook
        q, loss, idx, perplexity, counts, _ = self._quantize(z, flat_mask, True, False, backend,
                                                             codebook)
        self._watch_usage(counts)
        outputs = self._outputs(inputs, x, q, loss, idx, perplexity, flat_mask)
        if not return_loss_breakdown:
            return outputs
        commitment = self._quantize(z, flat_mask, False, False, backend, codebook)[1]
        return (*outputs, LossBreakdown.of(loss, commitment=commitment.float(),
                                           codebook=(loss - commitment).float()))
