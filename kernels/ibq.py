"""Index backpropagation quantization (IBQ): the softmax over all K codes, streamed.

``logits = scale * x @ E^T``, ``p = softmax(logits)``, ``idx = argmax``; the output
``(onehot(idx) - sg(p) + p) @ E`` has the value ``E[idx]`` and the softmax's gradient.
Shaped as attention with ``Q = x`` and ``K = V = E``, so written as flash attention is:

- forward, one program per ``BLOCK_N`` rows: the code tiles in order, ``tl.dot`` logits,
  a running max (and the first argmax), the running sum of ``exp(logit - max)`` and the
  running ``p @ E`` rescaled as the max moves; writes ``idx``, ``lse`` and ``soft = p @ E``
  (``ARGMAX_ONLY``: the codes alone, no exponentials);
- backward to the input, one program per ``BLOCK_N`` rows: the logits recomputed tile by
  tile, ``centre = sum_k p_k (g . e_k) / sum_k p_k`` summed in the same pass as the ``g .
  e_k`` it centres (so the softmax path's gradient is exactly 0 where p is one-hot in fp32;
  ``g . soft`` rounds otherwise, an error times ``scale``; dividing by the recomputed p's
  own sum keeps the centring exact where it is not 1 to within the logits' rounding),
  ``grad_x = scale * (sum_k p_k (g . e_k) e_k / sum_k p_k - centre * soft)`` (``=
  dlogits @ E``, ``dlogits = p * (g . e_k - centre) * scale``); also writes ``centre``;
- backward to the codebook, one program per ``BLOCK_K`` codes over all row tiles:
  ``grad_E = dlogits^T @ x + onehot^T @ g``.

Never ``[N, K]``; no atomics, so deterministic. Rows ``[N, D]`` fp32 (the op casts),
``D <= 128`` (the whole row sits in registers); fp32 dots at ``input_precision="ieee"``.
"""

import torch
import triton
import triton.language as tl

from ._launch import launch, cdiv, check_same_device, launcher, next_power_of_2

MAX_DIM = 128
# Per row width (BLOCK_D): tiles small enough that x, the gradient, a code tile and the
# running sums (all [*, BLOCK_D] fp32) stay in registers, unpipelined (num_stages=1: the
# multi-buffered loads spilled), with no spills on sm_80 / sm_90 (the AOT test checks). At
# D = 256 every tiling tried spilled in the codebook backward (it holds x, g, a code tile
# and the code gradients at once): wider rows take the torch path.
CONFIGS = {
    16: dict(BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1),
    32: dict(BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=1),
    64: dict(BLOCK_N=16, BLOCK_K=32, num_warps=8, num_stages=1),
    128: dict(BLOCK_N=16, BLOCK_K=32, num_warps=8, num_stages=1),
}


# The input backward also carries its centring sums: at D <= 16 four warps spilled 12 B on
# sm_80 with triton 3.6; eight do not (the forward keeps four: eight spilled there).
BACKWARD_X_WARPS = {16: 8}


def _config(d: int) -> dict:
    block_d = max(16, next_power_of_2(d))
    return dict(CONFIGS[block_d], BLOCK_D=block_d)


def _backward_x_config(config: dict) -> dict:
    return dict(config, num_warps=BACKWARD_X_WARPS.get(config["BLOCK_D"], config["num_warps"]))


@triton.jit
def _tile(ptr, index, mask, dims, D):
    """Rows ``index`` of a ``[*, D]`` fp32 matrix, as ``[len(index), BLOCK_D]`` (0 outside)."""
    offsets = index.to(tl.int64)[:, None] * D + dims[None, :]
    return tl.load(ptr + offsets, mask=mask[:, None] & (dims < D)[None, :], other=0.0)


@triton.jit
def _code_logits(x, codebook_ptr, k0, dims, K, D, scale, BLOCK_K: tl.constexpr):
    """Codes ``k0 .. k0 + BLOCK_K``: their mask, their tile ``e`` and the logits ``scale * x
    @ e^T`` of the rows ``x``."""
    codes = k0 + tl.arange(0, BLOCK_K)
    code_mask = codes < K
    e = _tile(codebook_ptr, codes, code_mask, dims, D)
    return code_mask, e, tl.dot(x, tl.trans(e), input_precision="ieee") * scale


@triton.jit
def _ibq_forward_kernel(
    x_ptr, codebook_ptr, idx_ptr, lse_ptr, soft_ptr, N, K, D, scale,
    ARGMAX_ONLY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    dims = tl.arange(0, BLOCK_D)
    x = _tile(x_ptr, rows, row_mask, dims, D)
    best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    running_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    soft = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        code_mask, e, logits = _code_logits(x, codebook_ptr, k0, dims, K, D, scale, BLOCK_K)
        logits = tl.where(code_mask[None, :], logits, float("-inf"))
        tile_max = tl.max(logits, axis=1)
        tile_arg = tl.argmax(logits, axis=1, tie_break_left=True)
        better = tile_max > best  # strictly: the first maximum wins, as argmax
        best_idx = tl.where(better, tile_arg + k0, best_idx)
        new_best = tl.maximum(best, tile_max)
        if not ARGMAX_ONLY:
            rescale = tl.exp(best - new_best)
            weights = tl.exp(logits - new_best[:, None])
            running_sum = running_sum * rescale + tl.sum(weights, axis=1)
            soft = soft * rescale[:, None] + tl.dot(weights, e, input_precision="ieee")
        best = new_best
    tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_mask)
    if not ARGMAX_ONLY:
        tl.store(lse_ptr + rows, best + tl.log(running_sum), mask=row_mask)
        out = rows.to(tl.int64)[:, None] * D + dims[None, :]
        tl.store(soft_ptr + out, soft / running_sum[:, None],
                 mask=row_mask[:, None] & (dims < D)[None, :])


@triton.jit
def _ibq_backward_x_kernel(
    grad_ptr, x_ptr, codebook_ptr, lse_ptr, soft_ptr, grad_x_ptr, centre_ptr, N, K, D, scale,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    dims = tl.arange(0, BLOCK_D)
    x = _tile(x_ptr, rows, row_mask, dims, D)
    g = _tile(grad_ptr, rows, row_mask, dims, D)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum_k p_k
    centre = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum_k p_k (g . e_k)
    weighted = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # sum_k p_k (g . e_k) e_k
    for k0 in range(0, K, BLOCK_K):
        code_mask, e, logits = _code_logits(x, codebook_ptr, k0, dims, K, D, scale, BLOCK_K)
        p = tl.where(code_mask[None, :], tl.exp(logits - lse[:, None]), 0.0)
        pg = p * tl.dot(g, tl.trans(e), input_precision="ieee")
        total += tl.sum(p, axis=1)
        centre += tl.sum(pg, axis=1)
        weighted += tl.dot(pg, e, input_precision="ieee")
    soft = _tile(soft_ptr, rows, row_mask, dims, D)  # p @ E
    grad_x = (weighted - centre[:, None] * soft) * (scale / total)[:, None]
    centre = centre / total
    out = rows.to(tl.int64)[:, None] * D + dims[None, :]
    tl.store(grad_x_ptr + out, grad_x, mask=row_mask[:, None] & (dims < D)[None, :])
    tl.store(centre_ptr + rows, centre, mask=row_mask)


@triton.jit
def _ibq_backward_codebook_kernel(
    grad_ptr, x_ptr, codebook_ptr, idx_ptr, lse_ptr, centre_ptr, grad_codebook_ptr,
    N, K, D, scale,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    code_mask = codes < K
    dims = tl.arange(0, BLOCK_D)
    e = _tile(codebook_ptr, codes, code_mask, dims, D)
    grad_e = tl.zeros([BLOCK_D, BLOCK_K], dtype=tl.float32)  # transposed: [D, codes]
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        x = _tile(x_ptr, rows, row_mask, dims, D)
        g = _tile(grad_ptr, rows, row_mask, dims, D)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        centre = tl.load(centre_ptr + rows, mask=row_mask, other=0.0)
        idx = tl.load(idx_ptr + rows, mask=row_mask, other=-1)
        logits = tl.dot(x, tl.trans(e), input_precision="ieee") * scale
        p = tl.where(row_mask[:, None], tl.exp(logits - lse[:, None]), 0.0)
        ge = tl.dot(g, tl.trans(e), input_precision="ieee")
        # dlogits, plus the one-hot of the chosen codes (the straight-through value's gradient)
        weight = p * (ge - centre[:, None]) * scale
        chosen = (idx[:, None] == codes[None, :]).to(tl.float32)
        grad_e = tl.dot(tl.trans(x), weight, grad_e, input_precision="ieee")
        grad_e = tl.dot(tl.trans(g), chosen, grad_e, input_precision="ieee")
    out = codes.to(tl.int64)[None, :] * D + dims[:, None]
    tl.store(grad_codebook_ptr + out, grad_e, mask=code_mask[None, :] & (dims < D)[:, None])


def _check(x, codebook):
    for name, t in (("x", x), ("codebook", codebook)):
        if t.dim() != 2 or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous fp32 [*, D], got {t.dtype} "
                             f"{tuple(t.shape)}")
    if x.shape[1] != codebook.shape[1]:
        raise ValueError(f"x has D={x.shape[1]} but the codebook has D={codebook.shape[1]}")
    if x.shape[1] > MAX_DIM:
        raise ValueError(f"the IBQ kernels take D <= {MAX_DIM}, got {x.shape[1]}")
    check_same_device(x=x, codebook=codebook)
    return x.shape[0], codebook.shape[0], x.shape[1]


@launcher
def ibq_forward(x, codebook, scale, argmax_only=False):
    """``x fp32 [N, D]``, ``codebook fp32 [K, D]`` -> ``idx int64 [N]`` (argmax of the
    logits), ``lse fp32 [N]`` and ``soft fp32 [N, D]`` (``p @ E``); with ``argmax_only``
    the last two are empty."""
    n, k, d = _check(x, codebook)
    config = _config(d)
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    lse = torch.empty(0 if argmax_only else n, dtype=torch.float32, device=x.device)
    soft = torch.empty((0,) if argmax_only else (n, d), dtype=torch.float32, device=x.device)
    launch(_ibq_forward_kernel, (cdiv(n, config["BLOCK_N"]),),
        x, codebook, idx, lse, soft, n, k, d, float(scale), ARGMAX_ONLY=bool(argmax_only),
        **config)
    return idx, lse, soft


@launcher
def ibq_backward(grad, x, codebook, idx, lse, soft, scale):
    """``(grad_x fp32 [N, D], grad_codebook fp32 [K, D])`` of the output for its gradient
    ``grad`` (fp32 ``[N, D]``): two launches, rows then codes."""
    n, k, d = _check(x, codebook)
    config = _config(d)
    grad_x = torch.empty_like(x)
    centre = torch.empty(n, dtype=torch.float32, device=x.device)
    launch(_ibq_backward_x_kernel, (cdiv(n, config["BLOCK_N"]),),
        grad, x, codebook, lse, soft, grad_x, centre, n, k, d, float(scale),
        **_backward_x_config(config))
    grad_codebook = torch.empty_like(codebook)
    launch(_ibq_backward_codebook_kernel, (cdiv(k, config["BLOCK_K"]),),
        grad, x, codebook, idx, lse, centre, grad_codebook, n, k, d, float(scale), **config)
    return grad_x, grad_codebook


def aot_variants():
    """Every launchable configuration, for the ahead-of-time compile test: the three
    kernels at every row width."""
    for block_d, config in CONFIGS.items():
        consts = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
        consts["BLOCK_D"] = block_d
        options = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
        sig = {"x_ptr": "*fp32", "codebook_ptr": "*fp32", "idx_ptr": "*i64", "lse_ptr": "*fp32",
               "soft_ptr": "*fp32", "N": "i32", "K": "i32", "D": "i32", "scale": "fp32"}
        for argmax_only in (False, True):
            yield (f"ibq_forward[D<={block_d},argmax_only={argmax_only}]", _ibq_forward_kernel,
                   sig, dict(consts, ARGMAX_ONLY=argmax_only), options)
        sig = {"grad_ptr": "*fp32", "x_ptr": "*fp32", "codebook_ptr": "*fp32", "lse_ptr": "*fp32",
               "soft_ptr": "*fp32", "grad_x_ptr": "*fp32", "centre_ptr": "*fp32", "N": "i32",
               "K": "i32", "D": "i32", "scale": "fp32"}
        yield (f"ibq_backward_x[D<={block_d}]", _ibq_backward_x_kernel, sig, consts,
               dict(options, num_warps=_backward_x_config(dict(config, BLOCK_D=block_d))["num_warps"]))
        sig = {"grad_ptr": "*fp32", "x_ptr": "*fp32", "codebook_ptr": "*fp32", "idx_ptr": "*i64",
               "lse_ptr": "*fp32", "centre_ptr": "*fp32", "grad_codebook_ptr": "*fp32",
               "N": "i32", "K": "i32", "D": "i32", "scale": "fp32"}
        yield (f"ibq_backward_codebook[D<={block_d}]", _ibq_backward_codebook_kernel, sig,
               consts, options)
