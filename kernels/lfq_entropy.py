"""LFQ's codebook entropy, exactly, over all ``2**d`` codes without an ``[N, 2**d]`` tensor.

With ``l = 2 * inv_temperature * x`` the code distribution of a vector is
``p(c|x) = exp(<l, c> - lse(x))`` over ``c`` in ``{-1, 1}^d``, and ``lse`` has the closed
form ``sum_i logaddexp(l_i, -l_i)``. The logits of a tile of codes are a small GEMM of
the vectors with the ``{-1, 1}`` code tile, generated from the code indices' bits in
registers (code ``c`` has +1 in channel ``i`` where bit ``d - 1 - i`` is set):

- forward, one program per tile of codes, streaming all N vectors:
  ``avg[c] = mean_n p(c|x_n)``, accumulated in fp32, no atomics (deterministic);
- backward, one program per tile of vectors, streaming all codes: with
  ``g[c] = dH/d avg[c]``, ``grad l_n = scale * (sum_c g_c p_n(c) c - tanh(l_n) sum_c g_c p_n(c))``
  (the second term since ``E_p[c] = tanh(l)``).
"""

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import launch, cdiv, launcher, PTR, check_matrix, check_same_device, split_options

MAX_DIM = 24  # 2**24 codes: the int32 code indices stay far from overflow
MAX_SLOTS = 65535  # a batch's slots: CUDA's limit on the grid's second axis
FORWARD_CONFIG = dict(BLOCK_N=32, BLOCK_C=64, BLOCK_D=32, num_warps=4)
BACKWARD_CONFIG = dict(BLOCK_N=16, BLOCK_C=32, BLOCK_D=32, num_warps=4)  # spill-free, triton 3.6-3.9


@triton.jit
def _code_tile(codes, dims, d):
    """``[BLOCK_D, BLOCK_C]`` of ±1 (0 past channel d): the codes' bits, first channel most significant."""
    shift = tl.where(dims < d, d - 1 - dims, 0)
    bits = (codes[None, :] >> shift[:, None]) & 1
    return tl.where((dims < d)[:, None], bits * 2 - 1, 0).to(tl.float32)


@triton.jit
def _lfq_avg_prob_kernel(
    x_ptr, lse_ptr, avg_ptr, N, d, num_codes, scale,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    slot = tl.program_id(1).to(tl.int64)  # (a batch of codebook entropies: one per slot)
    x_ptr += slot * N * d
    lse_ptr += slot * N
    avg_ptr += slot * num_codes
    codes = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    dims = tl.arange(0, BLOCK_D)
    code_tile = _code_tile(codes, dims, d)  # ±1: exact in any dtype
    if not UPCAST_DOT:
        code_tile = code_tile.to(x_ptr.dtype.element_ty)
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * d + dims[None, :],
                    mask=row_mask[:, None] & (dims < d)[None, :], other=0.0)
        if UPCAST_DOT:
            x = x.to(tl.float32)
        logits = tl.dot(x, code_tile, input_precision=INPUT_PRECISION) * scale
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        prob = tl.where(row_mask[:, None], tl.exp(logits - lse[:, None]), 0.0)
        total += tl.sum(prob, axis=0)
    tl.store(avg_ptr + codes, total / N, mask=codes < num_codes)


@triton.jit
def _lfq_entropy_backward_kernel(
    x_ptr, lse_ptr, g_ptr, grad_ptr, N, d, num_codes, scale, coef,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    slot = tl.program_id(1).to(tl.int64)
    x_ptr += slot * N * d
    grad_ptr += slot * N * d
    lse_ptr += slot * N
    g_ptr += slot * num_codes
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    dims = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (dims < d)[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * d + dims[None, :], mask=mask, other=0.0)
    if UPCAST_DOT:
        x = x.to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    weight_sum = tl.zeros([BLOCK_N], dtype=tl.float32)            # sum_c g_c p_n(c)
    weighted_codes = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # sum_c g_c p_n(c) c
    for c0 in range(0, num_codes, BLOCK_C):
        codes = c0 + tl.arange(0, BLOCK_C)
        code_mask = codes < num_codes
        code_tile = _code_tile(codes, dims, d)
        logits = tl.dot(x, code_tile.to(x.dtype), input_precision=INPUT_PRECISION)
        prob = tl.exp(logits * scale - lse[:, None])
        g = tl.load(g_ptr + codes, mask=code_mask, other=0.0)
        w = tl.where(row_mask[:, None] & code_mask[None, :], prob * g[None, :], 0.0)
        weight_sum += tl.sum(w, axis=1)
        # fp32 operands, fp32 products: the weights are not rounded to tf32
        weighted_codes = tl.dot(w, tl.trans(code_tile), weighted_codes, input_precision="ieee")
    l = x.to(tl.float32) * scale
    mean_code = 2.0 * tl.sigmoid(2.0 * l) - 1.0  # tanh(l)
    grad = (weighted_codes - mean_code * weight_sum[:, None]) * (coef * scale)
    tl.store(grad_ptr + rows.to(tl.int64)[:, None] * d + dims[None, :], grad, mask=mask)


def _check(x, lse):
    """``(slots, N, d)`` of ``x: [N, d]`` or a batch ``[slots, N, d]`` with its ``lse``."""
    if x.dim() not in (2, 3) or not x.is_contiguous() or 0 in x.shape:
        raise ValueError(f"x must be a contiguous, non-empty [N, d] or a batch [slots, N, d], "
                         f"got shape {tuple(x.shape)} (strides {x.stride()})")
    if x.dim() == 3 and x.shape[0] > MAX_SLOTS:
        raise ValueError(f"at most {MAX_SLOTS} slots (the grid's second axis), got {x.shape[0]}")
    check_matrix("x", x.view(-1, x.shape[-1]))  # (its dtype)
    if x.shape[-1] > MAX_DIM:
        raise ValueError(f"x must have d <= {MAX_DIM} channels (2**d codes), got {tuple(x.shape)}")
    if lse.shape != x.shape[:-1] or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous fp32 {list(x.shape[:-1])}, got {lse.dtype} "
                         f"{tuple(lse.shape)}")
    check_same_device(x=x, lse=lse)
    return (x.shape[0] if x.dim() == 3 else 1), x.shape[-2], x.shape[-1]


def _dot_options(x, precision):
    # The Triton interpreter multiplies 16-bit dot operands as raw bits: upcast there
    # (exact: the codes are ±1 and the products fit fp32).
    return dict(INPUT_PRECISION=precision if x.dtype == torch.float32 else "ieee",
                UPCAST_DOT=x.dtype != torch.float32 and _launch.interpreted(x.device))


@launcher
def lfq_avg_prob(x, lse, inv_temperature, precision="ieee"):
    """``x: [N, d]``, ``lse: fp32 [N]`` -> ``avg: fp32 [2**d]``, the batch-mean code
    distribution; or a batch of them, ``x: [slots, N, d]`` -> ``[slots, 2**d]``."""
    slots, n, d = _check(x, lse)
    num_codes = 2**d
    avg = torch.empty(*x.shape[:-2], num_codes, dtype=torch.float32, device=x.device)
    config = dict(FORWARD_CONFIG)
    launch(_lfq_avg_prob_kernel, (cdiv(num_codes, config["BLOCK_C"]), slots),
        x, lse, avg, n, d, num_codes, 2.0 * float(inv_temperature),
        **_dot_options(x, precision), **config)
    return avg


@launcher
def lfq_entropy_backward(x, lse, g, coef, inv_temperature, precision="ieee"):
    """``grad_x: fp32 [N, d]`` of ``coef * sum_c g[c] avg[c]`` (``g = dH/d avg``); batched
    as ``lfq_avg_prob`` (``g: [slots, 2**d]``)."""
    slots, n, d = _check(x, lse)
    if g.shape != (*x.shape[:-2], 2**d) or not g.is_contiguous():
        raise ValueError(f"g must be a contiguous [{', '.join(map(str, x.shape[:-2]))}"
                         f"{', ' if x.dim() == 3 else ''}{2**d}], got {tuple(g.shape)}")
    grad = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    config = dict(BACKWARD_CONFIG)
    launch(_lfq_entropy_backward_kernel, (cdiv(n, config["BLOCK_N"]), slots),
        x, lse, g, grad, n, d, 2**d, 2.0 * float(inv_temperature), float(coef),
        **_dot_options(x, precision), **config)
    return grad


def aot_variants():
    """Every launchable configuration, for the ahead-of-time compile test."""
    for dtype in PTR:
        for precision in (("ieee", "tf32x3") if dtype == "fp32" else ("ieee",)):
            consts, options = split_options(FORWARD_CONFIG)
            sig = {"x_ptr": PTR[dtype], "lse_ptr": "*fp32", "avg_ptr": "*fp32", "N": "i32",
                   "d": "i32", "num_codes": "i32", "scale": "fp32"}
            yield (f"lfq_avg_prob[{dtype},{precision}]", _lfq_avg_prob_kernel, sig,
                   dict(consts, INPUT_PRECISION=precision, UPCAST_DOT=False), options)
            consts, options = split_options(BACKWARD_CONFIG)
            sig = {"x_ptr": PTR[dtype], "lse_ptr": "*fp32", "g_ptr": "*fp32", "grad_ptr": "*fp32",
                   "N": "i32", "d": "i32", "num_codes": "i32", "scale": "fp32", "coef": "fp32"}
            yield (f"lfq_entropy_backward[{dtype},{precision}]", _lfq_entropy_backward_kernel,
                   sig, dict(consts, INPUT_PRECISION=precision, UPCAST_DOT=False), options)
