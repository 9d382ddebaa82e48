"""SimVQ (Zhu et al., 2024): the codebook as a learned linear map of a frozen basis."""

import torch
import torch.nn.functional as F

from .vq import nearest_code


def simvq(x: torch.Tensor, basis: torch.Tensor, weight: torch.Tensor, commitment_cost=0.25):
    """SimVQ (Zhu et al., 2024) of ``x: [N, D]`` by brute force: the codebook is ``basis
    [K, d] @ weight^T`` (``weight [D, d]`` learned, ``basis`` frozen); the nearest code by
    squared distance; ``loss = mse(q, sg(x)) + commitment_cost * mse(sg(q), x)``; the output
    ``x + sg(q - x)``. Returns ``(out, loss, idx)``; gradients reach ``x`` and ``weight``."""
    codebook = basis @ weight.t()
    idx = nearest_code(x.detach(), codebook.detach())
    q = codebook[idx]
    loss = F.mse_loss(q, x.detach()) + commitment_cost * F.mse_loss(x, q.detach())
    return x + (q - x).detach(), loss, idx
