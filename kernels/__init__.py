"""Triton kernels of vqfast, one fused op per file, each with its launcher.

Same signatures as the torch backend (``vqfast._torch``). CUDA tensors, or CPU tensors
under the Triton interpreter (``TRITON_INTERPRET=1`` set before import).
"""

from .ema_update import ema_update
from .fsq import fsq_backward, fsq_forward
from .gather_loss import gather_loss
from .lfq_entropy import lfq_avg_prob, lfq_entropy_backward
from .nearest_code import nearest_code
from .quantize_backward import quantize_backward
from . import residual
from .residual import residual_backward, residual_quantize

__all__ = ["nearest_code", "gather_loss", "ema_update", "quantize_backward", "fsq_forward",
           "fsq_backward", "lfq_avg_prob", "lfq_entropy_backward", "residual_quantize",
           "residual_backward", "residual"]
