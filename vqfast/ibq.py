"""``IndexBackpropVQ``: index backpropagation quantization (IBQ, Shi et al. 2024), every
code trained through a softmax over all of them, streamed over code tiles."""

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as VF
from .modules import LossBreakdown, QuantizerCommon, check_codes, check_number
from .ops.ibq import IBQ_MAX_KERNEL_DIM, ibq_codes, index_backprop


class IndexBackpropVQ(QuantizerCommon, nn.Module):
    """Index backpropagation quantization (IBQ, Shi et al. 2024).

    The code of a vector is the argmax of ``logits = logit_scale * x . e`` over all K
    codes; the output is ``(onehot - sg(p) + p) @ codebook`` with ``p = softmax(logits)``:
    the value of the chosen code, and a gradient that reaches the input and *every* code
    through the softmax (the paper's remedy for codebook collapse at K = 2**18). vqfast
    streams the logits in tiles of codes (a running max, sum and argmax forward; the
    backward recomputes them): memory ``O(N * D + K * D)``, never the ``[N, K]`` logits
    that other implementations build (1 GiB per 1,024 vectors at K = 262,144 in fp32).
    Deterministic. On CUDA fused Triton kernels stream it as flash attention does (one
    forward launch, two backward launches; rows of ``D <= 128``, wider ones take the torch
    path with ``backend="auto"``); elsewhere the torch path streams tiles of codes.

    Args:
        num_embeddings: K. embedding_dim: D.
        commitment_cost: beta: ``loss = mse(E[idx], sg(x)) + beta * mse(sg(E[idx]), x)``.
        logit_scale: the softmax's inverse temperature.
        channel_last, freeze_codebook, backend: as for ``VectorQuantizer``.

    ``forward(inputs: [B, D, *spatial], return_loss_breakdown=False)`` returns ``(loss,
    quantized, perplexity, codes)``; ``codebook`` is an ``nn.Parameter [K, D]`` initialised
    ``normal(0, 1/D)``. ``encode(x)``: the argmax alone (streamed, no softmax gradient
    state); ``decode_indices(codes)`` the chosen codes.
    """

    def __init__(self, num_embeddings, embedding_dim, commitment_cost=0.25, *, logit_scale=1.0,
                 channel_last=False, freeze_codebook=False, backend="auto"):
        super().__init__()
        if not (isinstance(num_embeddings, int) and isinstance(embedding_dim, int)
                and num_embeddings >= 1 and embedding_dim >= 1):
            raise ValueError(f"num_embeddings and embedding_dim must be ints >= 1, got "
                             f"{num_embeddings!r} and {embedding_dim!r}")
        check_number("commitment_cost", commitment_cost)
        check_number("logit_scale", logit_scale, above=True)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.commitment_cost, self.logit_scale = commitment_cost, float(logit_scale)
        VF.check_backend(backend)
        self.channel_last, self.freeze_codebook = bool(channel_last), freeze_codebook
        self.backend = backend
        self.codebook = nn.Parameter(torch.randn(num_embeddings, embedding_dim)
                                     * embedding_dim ** -0.5)

    def extra_repr(self):
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"commitment_cost={self.commitment_cost}, logit_scale={self.logit_scale}")

    def _state_options(self):
        return {}

    def _rows(self, inputs):
        x = self._vectors_of("inputs", inputs, self.embedding_dim)
        if x.device != self.codebook.device:
            raise ValueError(f"inputs are on {x.device} but the codebook is on "
                             f"{self.codebook.device}; move the module with .to(device)")
        return x.movedim(1, -1).reshape(-1, self.embedding_dim)  # a view when channel-last

    def _backend(self, device) -> str:
        backend = VF.resolve_backend(self.backend, device)
        if backend == "triton" and self.backend == "auto" and self.embedding_dim > IBQ_MAX_KERNEL_DIM:
            return "torch"  # (the kernels hold a whole row in registers)
        return backend

    def forward(self, inputs, return_loss_breakdown=False):
        rows = self._rows(inputs)
        codebook = self.codebook.detach() if self.freeze_codebook else self.codebook
        backend = self._backend(rows.device)
        out, idx = index_backprop(rows, codebook, self.logit_scale, backend)
        q = codebook[idx].float()
        commitment = self.commitment_cost * F.mse_loss(rows.float(), q.detach())
        codebook_term = F.mse_loss(q, rows.detach().float())
        loss = codebook_term + commitment
        counts = torch.zeros(self.num_embeddings, dtype=torch.int32, device=idx.device)
        counts.scatter_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))
        self._watch_usage(counts)
        out = out.to(inputs.dtype).view(*self._positions(inputs), self.embedding_dim)
        outputs = (loss, self._rows_in_layout(out).contiguous(),
                   VF.perplexity(counts, backend), idx.view(self._positions(inputs)))
        if return_loss_breakdown:
            return (*outputs, LossBreakdown.of(loss, commitment=commitment, codebook=codebook_term))
        return outputs

    @torch.no_grad()
    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """Codes only: int64 ``[B, *spatial]``, the streamed argmax of the logits."""
        rows = self._rows(inputs)
        idx = ibq_codes(rows, self.codebook, self.logit_scale, self._backend(rows.device))
        return idx.view(self._positions(inputs))

    @torch.no_grad()
    def decode_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 ``codes [B, *spatial]`` in ``[0, K)`` -> fp32 ``[B, D, *spatial]`` (channel
        last: ``[B, *spatial, D]``)."""
        check_codes(codes, self.num_embeddings, dropped_ok=False)
        return self._rows_in_layout(F.embedding(codes, self.codebook.detach().float()))
