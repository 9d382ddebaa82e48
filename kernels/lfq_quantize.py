"""LFQ's quantization and its per-vector terms in one pass over x (and one back).

For each vector ``x_n`` (d channels, ``d <= 24``): the code value ``sign = +scale`` where
``x > 0`` else ``-scale`` (stored in x's dtype), the code index ``sum_i [x_i > 0]
2**(d-1-i)`` with its count (integer atomics: exact, deterministic), the squared error to
the code and, with ``t = 4 * inv_temperature * scale * x``, the entropy of the vector's
code distribution in closed form (it factorises over channels into binary entropies
``H(t) = sigmoid(t) softplus(-t) + sigmoid(-t) softplus(t)``). The last program to finish
(an atomic ticket) reduces the programs' partial sums in a fixed order into the two
scaled terms: bitwise reproducible, no launch of its own.

The backward is elementwise: the straight-through gradient plus the two terms'
``2 (x - sign)`` and ``dH/dt = -t sigmoid(t) sigmoid(-t)``.
"""

import itertools

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import PTR, cdiv, check_same_device, launch, launcher
from ._layout import check_item_offsets, row_offsets, same_layout, vector_layout

MAX_DIM = 24  # (LFQ's limit: 2**24 codes)
MAX_SLOTS = 65535  # a batch's slots: CUDA's limit on the grid's second axis
CONFIG = dict(BLOCK_N=256, num_warps=4)
BLOCK_REDUCE = 512  # the last program's reduction width


@triton.jit
def _log1p(u):
    """``log(1 + u)`` accurate for small ``u >= 0`` (Goldberg's: no ``log1p`` here)."""
    w = 1.0 + u
    exact = w == 1.0
    return tl.where(exact, u, tl.log(w) * (u / tl.where(exact, 1.0, w - 1.0)))


@triton.jit
def _binary_entropy(t):
    """``sigmoid(t) softplus(-t) + sigmoid(-t) softplus(t)``, fp32, stable at any |t|: it
    is even in t, and with ``a = |t|``, ``e = exp(-a)``: ``log1p(e) + a e / (1 + e)``."""
    a = tl.abs(t)
    e = tl.exp(-a)
    return _log1p(e) + a * (e / (1.0 + e))


@triton.jit
def _binary_entropy_slope(t):
    """``dH/dt = -t sigmoid(t) sigmoid(-t) = -t e / (1 + e)^2``, ``e = exp(-|t|)`` (no
    overflow)."""
    e = tl.exp(-tl.abs(t))
    return -t * (e / ((1.0 + e) * (1.0 + e)))


@triton.jit
def _slot(N, D, slot_scale_ptr, slot_weight_ptr, SLOTS: tl.constexpr):
    """``(first element, scale factor, weight)`` of this program's slot: in a batch of
    slots (the program grid's second axis) slot ``l``'s vectors start ``l * N * D``
    elements in, its codes are scaled by ``slot_scale[l]`` and its terms weighted
    ``slot_weight[l]``; one slot: ``(0, 1, 1)``."""
    first, factor, weight = 0, 1.0, 1.0
    if SLOTS:
        slot = tl.program_id(1)
        first = slot.to(tl.int64) * N * D
        factor = tl.load(slot_scale_ptr + slot)
        weight = tl.load(slot_weight_ptr + slot)
    return first, factor, weight


@triton.jit
def _lfq_quantize_kernel(
    x_ptr, q_ptr, codes_ptr, counts_ptr, partial_ptr, ticket_ptr, commitment_ptr, entropy_ptr,
    slot_scale_ptr, slot_weight_ptr,
    N, D, S, scale, commitment_scale, entropy_scale, t_scale,
    BLOCK_N: tl.constexpr, BLOCK_REDUCE: tl.constexpr, ENTROPY: tl.constexpr,
    CODES: tl.constexpr, SLOTS: tl.constexpr, STATS_SEM: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0) * tl.num_programs(1)
    first, factor, weight = _slot(N, D, slot_scale_ptr, slot_weight_ptr, SLOTS)
    scale, t_scale = scale * factor, t_scale * factor
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    # Channel c of each row: the pointers step by S per channel (coalesced along the rows)
    offsets = first + row_offsets(rows, S, D)
    x_ptrs, q_ptrs = x_ptr + offsets, q_ptr + offsets
    codes = tl.zeros([BLOCK_N], dtype=tl.int32)
    err = tl.zeros([BLOCK_N], dtype=tl.float32)
    h = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c in range(0, D):  # first channel most significant
        x = tl.load(x_ptrs, mask=row_mask, other=0.0).to(tl.float32)
        positive = x > 0
        sign = tl.where(positive, scale, -scale).to(x_ptr.dtype.element_ty)
        if CODES:
            tl.store(q_ptrs, sign, mask=row_mask)
            codes = codes * 2 + positive.to(tl.int32)
        diff = x - sign.to(tl.float32)
        err += diff * diff
        if ENTROPY:
            h += _binary_entropy(x * t_scale)
        x_ptrs += S
        q_ptrs += S
    if CODES:
        tl.store(codes_ptr + rows, codes.to(tl.int64), mask=row_mask)
        tl.atomic_add(counts_ptr + codes, tl.full([BLOCK_N], 1, dtype=tl.int32), mask=row_mask,
                      sem=STATS_SEM)
    partial = 2 * (tl.program_id(1) * tl.num_programs(0) + pid)
    tl.store(partial_ptr + partial, tl.sum(tl.where(row_mask, err, 0.0), axis=0) * weight)
    if ENTROPY:
        tl.store(partial_ptr + partial + 1, tl.sum(tl.where(row_mask, h, 0.0), axis=0) * weight)
    # The hand-off (as gather_loss's): every warp's partials and counts are issued before
    # the ticket releases them; the last program's acquire sees them all (loads bypass L1).
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == programs - 1:
        lanes = tl.arange(0, BLOCK_REDUCE)
        commitment = tl.zeros([BLOCK_REDUCE], dtype=tl.float32)
        entropy = tl.zeros([BLOCK_REDUCE], dtype=tl.float32)
        for i in range(0, programs, BLOCK_REDUCE):
            live = i + lanes < programs
            commitment += tl.load(partial_ptr + 2 * (i + lanes), mask=live, other=0.0,
                                  cache_modifier=".cg")
            if ENTROPY:
                entropy += tl.load(partial_ptr + 2 * (i + lanes) + 1, mask=live, other=0.0,
                                   cache_modifier=".cg")
        tl.store(commitment_ptr, tl.sum(commitment, axis=0) * commitment_scale)
        tl.store(entropy_ptr, tl.sum(entropy, axis=0) * entropy_scale)


@triton.jit
def _lfq_quantize_backward_kernel(
    grad_q_ptr, x_ptr, grad_commitment_ptr, grad_entropy_ptr, grad_x_ptr,
    slot_scale_ptr, slot_weight_ptr,
    N, D, S, scale, commitment_grad_scale, entropy_grad_scale, t_scale,
    BLOCK_N: tl.constexpr, COMMITMENT: tl.constexpr, ENTROPY: tl.constexpr,
    GRAD_Q: tl.constexpr, SLOTS: tl.constexpr,
):
    first, factor, weight = _slot(N, D, slot_scale_ptr, slot_weight_ptr, SLOTS)
    scale, t_scale = scale * factor, t_scale * factor
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    offsets = first + row_offsets(rows, S, D)
    x_ptrs, grad_q_ptrs, grad_x_ptrs = x_ptr + offsets, grad_q_ptr + offsets, grad_x_ptr + offsets
    commitment_grad = tl.load(grad_commitment_ptr) * commitment_grad_scale * weight
    # (d/dx H(t_scale x) = t_scale H'(t): the slot's factor scales t_scale)
    entropy_grad = tl.load(grad_entropy_ptr) * entropy_grad_scale * weight * factor
    for c in range(0, D):
        x = tl.load(x_ptrs, mask=row_mask, other=0.0).to(tl.float32)
        sign = tl.where(x > 0, scale, -scale).to(x_ptr.dtype.element_ty).to(tl.float32)
        grad = tl.zeros_like(x)
        if GRAD_Q:
            grad += tl.load(grad_q_ptrs, mask=row_mask, other=0.0).to(tl.float32)
        if COMMITMENT:  # (a term without a gradient adds nothing, not 0 * inf)
            grad += commitment_grad * (x - sign)
        if ENTROPY:
            grad += entropy_grad * _binary_entropy_slope(x * t_scale)
        tl.store(grad_x_ptrs, grad.to(grad_x_ptr.dtype.element_ty), mask=row_mask)
        x_ptrs += S
        grad_q_ptrs += S
        grad_x_ptrs += S


def _layout(x: torch.Tensor):
    n, d, s = vector_layout("x", x)
    check_item_offsets("x", d, s)
    if n >= 2**31:
        raise ValueError(f"x has N={n} vectors; at most 2**31 - 1 (32-bit row indices)")
    if d > MAX_DIM:
        raise ValueError(f"x has {d} channels; LFQ takes at most {MAX_DIM}")
    return n, d, s, CONFIG


@launcher
def lfq_quantize(x: torch.Tensor, scale: float, commitment_cost: float, entropy_weight: float,
                 inv_temperature: float):
    """``x: [N, d]`` or ``[B, d, S]`` -> ``q`` (x's shape and dtype: ``+scale`` where
    ``x > 0``, else ``-scale``), ``commitment`` (fp32 0-d: ``commitment_cost * mean((x -
    q)^2)``), ``entropy`` (fp32 0-d: ``entropy_weight * mean_n H(p(.|x_n))``, 0 when
    ``entropy_weight`` is 0), ``codes`` (int64 ``[N]``, first channel most significant),
    ``counts`` (int32 ``[2**d]``); ``p(c|x) = softmax_c(2 * inv_temperature * <x * scale, c>)``
    over ``c`` in ``{-1, 1}^d``."""
    n, d, s, config = _layout(x)
    q = torch.empty_like(x)
    codes = torch.empty(n, dtype=torch.int64, device=x.device)
    counts = torch.zeros(2**d + 1, dtype=torch.int32, device=x.device)  # (+ the ticket)
    grid, args, options, (commitment, entropy) = _forward(
        x, (n, d, s, 1), config, (q, codes, counts, counts[2**d:]), None, scale,
        commitment_cost, entropy_weight, inv_temperature)
    launch(_lfq_quantize_kernel, grid, *args, **options)
    return q, commitment, entropy, codes, counts[:2**d]


@launcher
def lfq_terms(x: torch.Tensor, slot_scale: torch.Tensor, slot_weight: torch.Tensor,
              commitment_cost: float, entropy_weight: float, inv_temperature: float):
    """The two terms of ``lfq_quantize`` summed over a batch of slots ``x: [slots, N, d]``
    (rows), slot ``l`` quantized to ``±slot_scale[l]`` and weighted ``slot_weight[l]``
    (fp32 ``[slots]`` each, read on the device): ``commitment`` (fp32 0-d,
    ``commitment_cost * sum_l slot_weight[l] * mean((x_l - q_l)^2)``) and ``entropy``
    (``entropy_weight * sum_l slot_weight[l] * mean_n H(p(.|x_ln))``). Residual LFQ's levels."""
    n, d, s, slots, config = _slot_layout(x, slot_scale, slot_weight)
    grid, args, options, terms = _forward(x, (n, d, s, slots), config, None,
                                          (slot_scale, slot_weight), 1.0, commitment_cost,
                                          entropy_weight, inv_temperature)
    launch(_lfq_quantize_kernel, grid, *args, **options)
    return terms


def _forward(x, shape, config, outputs, slot_params, scale, commitment_cost, entropy_weight,
             inv_temperature):
    """The forward's launch: ``(grid, arguments, options, (commitment, entropy))``: the
    codes into ``outputs = (q, codes, counts, ticket)``, or none (``None``: the terms only);
    per-slot ``slot_params = (scale, weight)``, or one slot (``None``)."""
    n, d, s, slots = shape
    codes_out, slotted = outputs is not None, slot_params is not None
    if not codes_out:  # (stand-ins for the pointers the kernel then never touches)
        ticket = torch.zeros(1, dtype=torch.int32, device=x.device)
        outputs = (x, ticket, ticket, ticket)
    slot_params = slot_params if slotted else (x, x)
    grid = (cdiv(n, config["BLOCK_N"]), slots)
    partial = torch.empty(2 * grid[0] * slots, dtype=torch.float32, device=x.device)
    commitment = torch.empty((), dtype=torch.float32, device=x.device)
    entropy = torch.empty((), dtype=torch.float32, device=x.device)
    q, codes, counts, ticket = outputs
    args = (x, q, codes, counts, partial, ticket, commitment, entropy, *slot_params, n, d, s,
            float(scale), float(commitment_cost) / (n * d), float(entropy_weight) / n,
            4.0 * float(inv_temperature) * float(scale))
    options = dict(BLOCK_REDUCE=BLOCK_REDUCE, ENTROPY=bool(entropy_weight), CODES=codes_out,
                   SLOTS=slotted, STATS_SEM=_launch.STATS_SEM, **config)
    return grid, args, options, (commitment, entropy)


@launcher
def lfq_quantize_backward(grad_q: torch.Tensor, grad_commitment: torch.Tensor,
                          grad_entropy: torch.Tensor, x: torch.Tensor, scale: float,
                          commitment_cost: float, entropy_weight: float, inv_temperature: float):
    """``grad_x`` (x's shape and dtype) of ``lfq_quantize``'s outputs: ``grad_q``
    straight through (``None``: q took no gradient), plus the two terms' gradients
    (``grad_commitment``, ``grad_entropy``: fp32 0-d, read on the device; a term whose
    weight is 0 adds nothing)."""
    n, d, s, config = _layout(x)
    if grad_q is not None:
        same_layout("grad_q", grad_q, x)
        check_same_device(grad_q=grad_q, x=x)
    check_same_device(grad_commitment=grad_commitment, grad_entropy=grad_entropy, x=x)
    grad_x, grid, args, options = _backward(grad_q, grad_commitment, grad_entropy, x,
                                            (n, d, s, 1), config, None, scale,
                                            commitment_cost, entropy_weight, inv_temperature)
    launch(_lfq_quantize_backward_kernel, grid, *args, **options)
    return grad_x


@launcher
def lfq_terms_backward(grad_commitment: torch.Tensor, grad_entropy: torch.Tensor,
                       x: torch.Tensor, slot_scale: torch.Tensor, slot_weight: torch.Tensor,
                       commitment_cost: float, entropy_weight: float, inv_temperature: float):
    """``grad_x`` (x's shape and dtype) of ``lfq_terms``' two terms."""
    n, d, s, slots, config = _slot_layout(x, slot_scale, slot_weight)
    check_same_device(grad_commitment=grad_commitment, grad_entropy=grad_entropy, x=x)
    grad_x, grid, args, options = _backward(None, grad_commitment, grad_entropy, x,
                                            (n, d, s, slots), config, (slot_scale, slot_weight),
                                            1.0, commitment_cost, entropy_weight,
                                            inv_temperature)
    launch(_lfq_quantize_backward_kernel, grid, *args, **options)
    return grad_x


def _backward(grad_q, grad_commitment, grad_entropy, x, shape, config, slot_params, scale,
              commitment_cost, entropy_weight, inv_temperature):
    """The backward's launch: ``(grad_x, grid, arguments, options)``; no ``grad_q`` (the
    terms only) and one slot (``slot_params`` None) as in ``_forward``."""
    n, d, s, slots = shape
    slotted = slot_params is not None
    slot_params = slot_params if slotted else (x, x)
    grad_x = torch.empty_like(x)
    t_scale = 4.0 * float(inv_temperature) * float(scale)
    args = (x if grad_q is None else grad_q, x, grad_commitment, grad_entropy, grad_x,
            *slot_params, n, d, s, float(scale), 2.0 * float(commitment_cost) / (n * d),
            float(entropy_weight) / n * t_scale, t_scale)
    options = dict(COMMITMENT=bool(commitment_cost), ENTROPY=bool(entropy_weight),
                   GRAD_Q=grad_q is not None, SLOTS=slotted, **config)
    return grad_x, (cdiv(n, config["BLOCK_N"]), slots), args, options


def _slot_layout(x, slot_scale, slot_weight):
    """``(N, d, 1, slots, config)`` of a batch of slots of rows ``[slots, N, d]``."""
    slots = x.shape[0] if x.dim() == 3 else 0
    if not 1 <= slots <= MAX_SLOTS or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous [slots, N, d] with 1 to {MAX_SLOTS} slots, got "
                         f"shape {tuple(x.shape)}")
    n, d, s, config = _layout(x[0])
    for name, t in (("slot_scale", slot_scale), ("slot_weight", slot_weight)):
        if t.shape != (slots,) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous fp32 [{slots}], got {t.dtype} "
                             f"{tuple(t.shape)}")
    check_same_device(x=x, slot_scale=slot_scale, slot_weight=slot_weight)
    return n, d, s, slots, config


def aot_variants():
    """Every launchable configuration, for the ahead-of-time compile test."""
    options = {"num_warps": CONFIG["num_warps"]}
    slot_sig = {"slot_scale_ptr": "*fp32", "slot_weight_ptr": "*fp32"}
    for dtype, entropy, slots in itertools.product(PTR, (True, False), (False, True)):
        consts = dict(BLOCK_N=CONFIG["BLOCK_N"], ENTROPY=entropy, SLOTS=slots)
        stand_in = slot_sig if slots else {"slot_scale_ptr": PTR[dtype], "slot_weight_ptr": PTR[dtype]}
        # (lfq_terms: the codes' pointers are x's and the ticket's; it stores no codes)
        sig = {"x_ptr": PTR[dtype], "q_ptr": PTR[dtype], "codes_ptr": "*i32" if slots else "*i64",
               "counts_ptr": "*i32", "partial_ptr": "*fp32", "ticket_ptr": "*i32",
               "commitment_ptr": "*fp32", "entropy_ptr": "*fp32", **stand_in, "N": "i32",
               "D": "i32", "S": "i32", "scale": "fp32", "commitment_scale": "fp32",
               "entropy_scale": "fp32", "t_scale": "fp32"}
        yield (f"lfq_quantize[{dtype},entropy={entropy},slots={slots}]", _lfq_quantize_kernel,
               sig, dict(consts, BLOCK_REDUCE=BLOCK_REDUCE, STATS_SEM=_launch.STATS_SEM,
                         CODES=not slots), options)
        sig = {"grad_q_ptr": PTR[dtype], "x_ptr": PTR[dtype], "grad_commitment_ptr": "*fp32",
               "grad_entropy_ptr": "*fp32", "grad_x_ptr": PTR[dtype], **stand_in, "N": "i32",
               "D": "i32", "S": "i32", "scale": "fp32", "commitment_grad_scale": "fp32",
               "entropy_grad_scale": "fp32", "t_scale": "fp32"}
        # (grad_q: q's gradient, or none when q took none; the slots' terms never have one)
        for commitment, grad_q in itertools.product((True, False), (False,) if slots else
                                                    (True, False)):
            yield (f"lfq_quantize_backward[{dtype},commitment={commitment},entropy={entropy},"
                   f"slots={slots},grad_q={grad_q}]", _lfq_quantize_backward_kernel, sig,
                   dict(consts, COMMITMENT=commitment, GRAD_Q=grad_q), options)
