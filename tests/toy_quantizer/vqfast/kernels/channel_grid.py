"""The toy quantizer's kernel: each channel of each vector to its nearest level."""

import torch
import triton
import triton.language as tl

from ._launch import PTR, cdiv, check_same_device, launch, launcher

CONFIG = dict(BLOCK_S=64, num_warps=4)


@triton.jit
def _channel_grid_kernel(z_ptr, levels_ptr, q_ptr, codes_ptr, C, S, L: tl.constexpr,
                         BLOCK_S: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = s < S
    code = tl.zeros([BLOCK_S], dtype=tl.int64)
    radix = 1
    for c in range(C):
        offsets = (b * C + c) * S + s
        v = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        best = tl.full([BLOCK_S], float("inf"), tl.float32)
        digit = tl.zeros([BLOCK_S], dtype=tl.int64)
        value = tl.zeros([BLOCK_S], dtype=tl.float32)
        for i in tl.static_range(L):
            level = tl.load(levels_ptr + c * L + i)
            dist = tl.abs(v - level)
            closer = dist < best
            best = tl.where(closer, dist, best)
            digit = tl.where(closer, i, digit)
            value = tl.where(closer, level, value)
        tl.store(q_ptr + offsets, value.to(q_ptr.dtype.element_ty), mask=mask)
        code += digit * radix
        radix *= L
    tl.store(codes_ptr + b * S + s, code, mask=mask)


@launcher
def channel_grid_forward(z: torch.Tensor, levels: torch.Tensor):
    """``z: [B, C, S]``, ``levels: fp32 [C, L]`` -> ``(q [B, C, S], codes int64 [B * S])``."""
    b, c, s = z.shape
    check_same_device(z=z, levels=levels)
    if levels.shape[0] != c or levels.dtype != torch.float32 or not levels.is_contiguous():
        raise ValueError(f"levels must be a contiguous fp32 [{c}, L], got {levels.dtype} "
                         f"{tuple(levels.shape)}")
    q = torch.empty_like(z)
    codes = torch.empty(b * s, dtype=torch.int64, device=z.device)
    launch(_channel_grid_kernel, (cdiv(s, CONFIG["BLOCK_S"]), b), z, levels, q, codes, c, s,
           L=levels.shape[1], **CONFIG)
    return q, codes


def aot_variants():
    for dtype in PTR:
        sig = {"z_ptr": PTR[dtype], "levels_ptr": "*fp32", "q_ptr": PTR[dtype], "codes_ptr": "*i64",
               "C": "i32", "S": "i32"}
        yield (f"channel_grid_forward[{dtype}]", _channel_grid_kernel, sig,
               {"L": 4, "BLOCK_S": CONFIG["BLOCK_S"]}, {"num_warps": CONFIG["num_warps"]})
