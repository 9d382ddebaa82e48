"""VAR's multi-scale residual quantization, as its ``VectorQuantizer2.forward``."""

import torch
import torch.nn.functional as F

from .vq import nearest_code


def multiscale_residual_vq(f: torch.Tensor, codebook: torch.Tensor, scales, phis,
                           commitment_cost=0.25, upsample="bicubic"):
    """VAR's multi-scale residual quantization (Tian et al., 2024) of ``f: [B, D, H, W]``, as
    its ``VectorQuantizer2.forward``: for each size ``(h, w)`` of ``scales`` (coarse to
    fine), the rest ``f - f_hat`` area-downsampled (not when it is ``H x W``), each
    position's nearest code by the ``[N, K]`` distance matrix, the codes upsampled
    (``upsample``) to ``H x W``, through ``phis[s]`` (callables), added to ``f_hat``.

    ``loss = mean_s [beta * mse(sg(f_hat_s), f) + mse(f_hat_s, sg(f))]``; the output is
    ``f_hat`` with the identity's gradient. Returns ``(loss, f_hat, codes, rests)``: per
    scale, ``codes`` int64 ``[B, h, w]`` and the rows searched ``[B*h*w, D]`` (detached).
    """
    b, d, height, width = f.shape
    f_rest = f.detach().clone()
    f_hat = torch.zeros_like(f)
    loss, codes, rests = 0.0, [], []
    for s, (h, w) in enumerate(scales):
        rest = f_rest if (h, w) == (height, width) else F.interpolate(f_rest, size=(h, w), mode="area")
        rows = rest.permute(0, 2, 3, 1).reshape(-1, d)
        idx = nearest_code(rows, codebook.detach())
        codes.append(idx.view(b, h, w))
        rests.append(rows)
        q = codebook[idx].view(b, h, w, d).permute(0, 3, 1, 2)
        if (h, w) != (height, width):
            options = {} if upsample == "nearest" else {"align_corners": False}
            q = F.interpolate(q, size=(height, width), mode=upsample, **options)
        q = phis[s](q)
        f_hat = f_hat + q
        f_rest = f_rest - q.detach()
        loss = loss + commitment_cost * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach())
    return loss / len(scales), f + (f_hat - f).detach(), codes, rests
