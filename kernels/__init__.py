"""Triton kernels of vqfast, one fused op per file, each with its launcher.

Same signatures as the torch backend (``vqfast._torch``). CUDA tensors, or CPU tensors
under the Triton interpreter (``TRITON_INTERPRET=1`` set before import).
"""

from .ema_update import ema_update, reseed_codes
from .fsq import fsq_backward, fsq_forward
from .gather_loss import gather_loss
from .ibq import ibq_backward, ibq_forward
from .lfq_entropy import lfq_avg_prob, lfq_entropy_backward
from .nearest_code import nearest_code
from .quantize_backward import quantize_backward
from .residual_scalar import residual_fsq_backward, residual_scalar_forward
from .residual_vq import residual_backward, residual_codes, residual_quantize

# The registry of kernel modules: each lists its launchable configurations
# (``aot_variants()``), which the ahead-of-time test compiles and checks for both targets.
# tests/test_aot.py fails if a module holding a @triton.jit kernel is missing here.
KERNEL_MODULES = ("nearest_code", "gather_loss", "code_sums", "ema_update", "quantize_backward",
                  "fsq", "lfq_entropy", "residual_vq", "residual_scalar", "ibq")

__all__ = ["nearest_code", "gather_loss", "ema_update", "reseed_codes", "quantize_backward", "fsq_forward",
           "fsq_backward", "lfq_avg_prob", "lfq_entropy_backward", "residual_quantize",
           "residual_backward", "residual_codes", "residual_scalar_forward", "residual_fsq_backward", "ibq_forward",
           "ibq_backward",
           "KERNEL_MODULES"]
