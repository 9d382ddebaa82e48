"""Backward of the quantizer: straight-through + commitment gradient for x, and the
codebook gradient as a scatter-add, in one pass over ``(grad_q, x, q)``.

``grad_x = grad_q + g * x_scale * (x - q)``,
``grad_codebook[k] += g * codebook_scale * (q - x)`` for every row assigned to ``k``,
with ``g`` the loss's incoming gradient, read on the device (no host sync).
"""

import torch
import triton
import triton.language as tl

from ._checks import check_rows, check_same_device, launch_config
from ._layout import row_offsets, same_layout, vector_layout
from .code_sums import code_sums_sorted

CONFIG = dict(BLOCK_N=32, MAX_BLOCK_D=64, num_warps=4)


@triton.jit
def _quantize_backward_kernel(
    grad_q_ptr, x_ptr, q_ptr, idx_ptr, grad_loss_ptr, grad_x_ptr, grad_codebook_ptr,
    N, D, S, x_scale, codebook_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ATOMIC_CODEBOOK_GRAD: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (dims < D)[None, :]
    offsets = row_offsets(rows, S, D)[:, None] + dims[None, :] * S
    grad_loss = tl.load(grad_loss_ptr)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad_q = tl.load(grad_q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    diff = q - x
    grad_x = grad_q - (grad_loss * x_scale) * diff
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if ATOMIC_CODEBOOK_GRAD:
        codes = tl.load(idx_ptr + rows, mask=rows < N, other=0)
        tl.atomic_add(grad_codebook_ptr + codes[:, None] * D + dims[None, :],
                      (grad_loss * codebook_scale) * diff, mask=mask)


def quantize_backward(grad_q, grad_loss, x, q, idx, num_codes, x_scale, codebook_scale):
    """Gradients of the quantizer: ``grad_x`` (x's shape and dtype) and ``grad_codebook``
    (fp32 ``[K, D]``, ``None`` when ``codebook_scale == 0``).

    Deterministic mode takes the codebook gradient from the sort-based segment sums.
    """
    n, d, s = vector_layout("x", x)
    same_layout("grad_q", grad_q, x)
    same_layout("q", q, x)
    check_same_device(grad_q=grad_q, grad_loss=grad_loss, x=x, q=q, idx=idx)
    check_rows("idx", idx, n, torch.int64)
    grad_loss = grad_loss.float().reshape(1)
    with_grad = codebook_scale != 0
    atomic = with_grad and not torch.are_deterministic_algorithms_enabled()
    grad_x = torch.empty_like(x)
    grad_codebook = (torch.zeros(num_codes, d, dtype=torch.float32, device=x.device)
                     if atomic else None)
    config = launch_config(CONFIG, d)
    grid = (triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(d, config["BLOCK_D"]))
    _quantize_backward_kernel[grid](
        grad_q, x, q, idx, grad_loss, grad_x, grad_codebook if atomic else grad_x,
        n, d, s, float(x_scale), float(codebook_scale),
        ATOMIC_CODEBOOK_GRAD=atomic, **config)
    if with_grad and not atomic:
        counts = torch.bincount(idx, minlength=num_codes).to(torch.int32)
        grad_codebook = code_sums_sorted(x, idx, counts, q=q, scale=grad_loss * codebook_scale)
    return grad_x, grad_codebook
