"""Backward of the quantizer: straight-through + commitment gradient for x, and the
codebook gradient as a scatter-add, in one pass over ``(grad_q, x)`` and the codes.

``q = codebook[idx]`` is gathered again in fp32 (the forward's output, rounded to x's
dtype, is not saved: for fp16/bf16 inputs it would round the codebook gradient too).
``grad_x = grad_q + g * x_scale * (x - q)``,
``grad_codebook[k] += g * codebook_scale * (q - x)`` for every row assigned to ``k``,
with ``g`` the loss's incoming gradient, read on the device (no host sync).
"""

import itertools

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import (launch, cdiv, launcher, PTR, check_codebook, check_rows, check_same_device, launch_config,
                      streaming_configs)
from ._layout import check_item_offsets, row_offsets, same_layout, vector_layout
from .code_sums import code_sums_sorted

CONFIG = dict(BLOCK_N=32, MAX_BLOCK_D=64, num_warps=8)


@triton.jit
def _quantize_backward_kernel(
    grad_q_ptr, x_ptr, codebook_ptr, idx_ptr, grad_loss_ptr, grad_x_ptr, grad_codebook_ptr,
    N, D, S, x_scale, codebook_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ATOMIC_CODEBOOK_GRAD: tl.constexpr,
    STATS_SEM: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    vector_offsets = row_offsets(rows, S, D)[:, None]
    codes = tl.load(idx_ptr + rows, mask=row_mask, other=0)
    code_offsets = codes[:, None] * D
    grad_loss = tl.load(grad_loss_ptr)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (dims < D)[None, :]
        offsets = vector_offsets + dims[None, :] * S
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        q = tl.load(codebook_ptr + code_offsets + dims[None, :], mask=mask, other=0.0)
        grad_q = tl.load(grad_q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        diff = q - x
        grad_x = grad_q - (grad_loss * x_scale) * diff
        tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
        if ATOMIC_CODEBOOK_GRAD:
            tl.atomic_add(grad_codebook_ptr + code_offsets + dims[None, :],
                          (grad_loss * codebook_scale) * diff, mask=mask, sem=STATS_SEM)


@launcher
def quantize_backward(grad_q, grad_loss, x, codebook, idx, x_scale, codebook_scale,
                      grad_codebook=None):
    """Gradients of the quantizer: ``grad_x`` (x's shape and dtype) and ``grad_codebook``
    (fp32 ``[K, D]``, ``None`` when ``codebook_scale == 0``), from ``q = codebook[idx]``
    in fp32.

    ``grad_codebook`` (fp32 ``[K, D]``, zeroed), if given, receives the codebook gradient
    (added into it) and is returned. Deterministic mode takes the codebook gradient from
    the sort-based segment sums.
    """
    n, d, s = vector_layout("x", x)
    check_item_offsets("x", d, s)
    same_layout("grad_q", grad_q, x)
    check_codebook(codebook, d)
    check_same_device(grad_q=grad_q, grad_loss=grad_loss, x=x, codebook=codebook, idx=idx)
    check_rows("idx", idx, n, torch.int64)
    codebook = codebook.float()
    num_codes = codebook.shape[0]
    grad_loss = grad_loss.float().reshape(1)
    with_grad = codebook_scale != 0
    atomic = with_grad and not torch.are_deterministic_algorithms_enabled()
    grad_x = torch.empty_like(x)
    if not atomic:
        grad_codebook = None
    elif grad_codebook is None:
        grad_codebook = torch.zeros(num_codes, d, dtype=torch.float32, device=x.device)
    elif grad_codebook.shape != (num_codes, d) or grad_codebook.dtype != torch.float32:
        raise ValueError(f"grad_codebook must be fp32 [{num_codes}, {d}], got "
                         f"{grad_codebook.dtype} {tuple(grad_codebook.shape)}")
    config = launch_config(CONFIG, d)
    grid = (cdiv(n, config["BLOCK_N"]),)
    launch(_quantize_backward_kernel, grid,
        grad_q, x, codebook, idx, grad_loss, grad_x, grad_codebook if atomic else grad_x,
        n, d, s, float(x_scale), float(codebook_scale),
        ATOMIC_CODEBOOK_GRAD=atomic, STATS_SEM=_launch.STATS_SEM, **config)
    if with_grad and not atomic:
        grad_codebook = code_sums_sorted(x, idx, num_codes, codebook=codebook,
                                         scale=grad_loss * codebook_scale)
    return grad_x, grad_codebook


def aot_variants():
    """Every launchable configuration, for the ahead-of-time compile test."""
    for dtype, (cfg, options), atomic in itertools.product(PTR, streaming_configs(CONFIG),
                                                            (True, False)):
        sig = {"grad_q_ptr": PTR[dtype], "x_ptr": PTR[dtype], "codebook_ptr": "*fp32",
               "idx_ptr": "*i64", "grad_loss_ptr": "*fp32", "grad_x_ptr": PTR[dtype],
               "grad_codebook_ptr": "*fp32" if atomic else PTR[dtype], "N": "i32", "D": "i32",
               "S": "i32", "x_scale": "fp32", "codebook_scale": "fp32"}
        yield (f"quantize_backward[{dtype},D{cfg['BLOCK_D']},atomic={atomic}]",
               _quantize_backward_kernel, sig, dict(cfg, ATOMIC_CODEBOOK_GRAD=atomic,
                                                                     STATS_SEM=_launch.STATS_SEM), options)
