"""The public functional API: ``nearest_code`` and the building blocks the modules use
(``quantize``, ``ema_update``, ``perplexity``, the input checks). Thin: the custom ops and
autograd live in ``vqfast.ops`` (``ops/vq.py`` for this family), the dispatch and shared
checks in ``vqfast.ops.dispatch``."""

import torch

from . import _torch
from .ops.dispatch import (BACKENDS, FLOAT_DTYPES, PRECISIONS, channels_first, channels_last,  # noqa: F401
                           check_backend, check_codebook_input, resolve_backend)
from .ops.residual_vq import _level_perplexity_op
from .ops.vq import _nearest_code_op, ema_update, quantize, reseed_codes  # noqa: F401


def perplexity(counts: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """``exp(entropy)`` of the code usage ``counts [K]`` (the original's formula, fp32 0-d):
    one launch on the Triton backend for int32 counts."""
    if counts.dtype != torch.int32 or backend != "triton":
        return _torch.perplexity(counts)
    return _level_perplexity_op(counts.reshape(1, -1), backend).view(())


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, backend: str = "auto",
                 precision: str = "ieee"):
    """Nearest code of every row: ``x: [N, D]``, ``codebook: [K, D]`` -> ``int64 [N]``, ``fp32 [N]``.

    The distance returned is ``|x - e|^2`` from the expanded form ``|x|^2 + |e|^2 - 2 x.e``
    in fp32 (clamped at 0). ``precision`` picks the Triton dot precision for fp32 inputs:
    ``"ieee"`` (default: argmins agree with fp32 matmul up to rounding ties), ``"tf32x3"``
    (near-fp32, on tensor cores) or ``"tf32"`` (fastest; may flip near-ties). No ``[N, K]``
    tensor is allocated on either backend.
    """
    if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2:
        raise ValueError("codebook must be a [K, D] tensor")
    check_codebook_input(x, codebook)
    if x.dim() != 2:
        raise ValueError(f"x must be [N, D], got shape {tuple(x.shape)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    backend = resolve_backend(backend, x.device)
    return _nearest_code_op(x.contiguous(), codebook.detach().contiguous(), backend,
                                         precision)


def export_decompositions() -> dict:
    """Plain-torch decompositions of vqfast's encode ops, for graphs that must hold only
    standard ops (ONNX): ``torch.export.export(m, args).run_decompositions(
    vqfast.export_decompositions())``, then ``torch.onnx.export(program, ...)``. Codes
    equal the torch path's (same formula, first index on ties). Covers ``nearest_code``
    (what a patched model's encode and ``VectorQuantizer(EMA).encode`` call),
    ``residual_codes`` (``ResidualVQ.encode``), ``fsq_forward`` (``FSQ.encode``) and
    ``ibq_forward`` (``IndexBackpropVQ.encode``); ``LFQ`` and ``SimVQ`` encode with
    standard ops already."""
    ops = torch.ops.vqfast
    return {ops.nearest_code.default: _torch.nearest_code_functional,
            ops.residual_codes.default: _torch.residual_codes_functional,
            ops.fsq_forward.default: lambda z, params, basis, backend: _torch.fsq_forward(
                z, params, basis),
            ops.ibq_forward.default: _torch.ibq_forward_functional}
