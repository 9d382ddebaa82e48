"""Index Backpropagation Quantization (Shi et al., 2024)."""

import torch
import torch.nn.functional as F


def ibq(x: torch.Tensor, codebook: torch.Tensor, commitment_cost=0.25, scale=1.0):
    """Index backpropagation quantization (Shi et al., 2024) of ``x: [N, D]`` with plain
    ``[N, K]`` logits: ``p = softmax(scale * x @ E^T)``, ``idx = argmax``, the output
    ``(onehot(idx) - sg(p) + p) @ E`` (value ``E[idx]``, gradient through the softmax to
    ``x`` and every code); ``loss = mse(E[idx], sg(x)) + commitment_cost * mse(sg(E[idx]),
    x)``. Returns ``(out, loss, idx)``."""
    logits = scale * x @ codebook.t()
    p = torch.softmax(logits, dim=1)
    idx = logits.argmax(1)
    onehot = F.one_hot(idx, codebook.shape[0]).to(p.dtype)
    out = (onehot - p.detach() + p) @ codebook
    q = codebook[idx]
    loss = F.mse_loss(q, x.detach()) + commitment_cost * F.mse_loss(q.detach(), x)
    return out, loss, idx
