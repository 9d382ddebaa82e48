"""The toy quantizer's torch backend (same signature as its launcher)."""

import torch


def channel_grid_forward(z: torch.Tensor, levels: torch.Tensor):
    """``z: [B, C, S]``, ``levels: fp32 [C, L]`` -> ``(q [B, C, S], codes int64 [B * S])``."""
    b, c, s = z.shape
    num = levels.shape[1]
    digit = (z.float()[:, :, None, :] - levels[None, :, :, None]).abs().argmin(2)  # [B, C, S]
    q = levels.gather(1, digit.permute(1, 0, 2).reshape(c, -1)).view(c, b, s).permute(1, 0, 2)
    radix = num ** torch.arange(c, device=z.device)
    codes = (digit * radix[None, :, None]).sum(1)
    return q.to(z.dtype).contiguous(), codes.reshape(-1)
