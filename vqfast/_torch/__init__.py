"""The lean torch backend: the fused ops of ``vqfast.kernels`` written with torch ops, one
module per family as there (``_common`` holds what they share).

Same signatures as the Triton launchers: vectors come as ``[N, D]`` rows or channels-first
``[B, D, S]`` (vector ``n = b * S + s``). Never allocates ``[N, K]`` nor a flattened copy
of the input: every op walks the vectors in chunks of at most ``_CHUNK_ELEMENTS`` entries
(distances, differences), counts with a 1-D ``scatter_add_`` and sums per code with ``index_add_``.
Everything accumulates in fp32.
"""

# On the CPU, reading a value back costs nothing (there is no device to wait for): the torch
# path then takes shortcuts that read one (skip a copy no code needs, update only the
# codebooks a batch used). Off, every device takes the branch-free rule a CUDA device
# takes; the no-host-read tests switch them off to check that rule on the CPU.
CPU_SHORTCUTS = True

from ._common import num_vectors  # noqa: F401,E402
from .vq import (nearest_code, nearest_code_functional, gather_loss, perplexity, ema_update,
                 reseed_codes, random_rows, take_samples, quantize_backward)  # noqa: F401,E402
from .residual_vq import (book_of, rotation_grad, residual_codes, residual_codes_functional,
                          residual_quantize, residual_backward)  # noqa: F401,E402
from .fsq import fsq_forward, fsq_backward  # noqa: F401,E402
from .lfq import lfq_avg_prob, lfq_entropy_backward  # noqa: F401,E402
from .residual_scalar import residual_scalar_forward, residual_fsq_backward  # noqa: F401,E402
from .ibq import ibq_forward_functional, ibq_forward, ibq_backward  # noqa: F401,E402


