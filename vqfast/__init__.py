"""vqfast: vector quantization for PyTorch, fused Triton kernels on CUDA, a lean torch path elsewhere."""

from .functional import nearest_code
from .modules import VectorQuantizer, VectorQuantizerEMA

__version__ = "0.1.0"

__all__ = ["VectorQuantizer", "VectorQuantizerEMA", "nearest_code", "__version__"]
