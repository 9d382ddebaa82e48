"""vqfast: vector quantization for PyTorch, fused Triton kernels on CUDA, a lean torch path elsewhere."""

from .functional import export_decompositions, nearest_code
from .lookup_free import FSQ, LFQ
from .model import VQVAE, Decoder, Encoder, Residual, ResidualStack
from .modules import (ORIGINAL_ALGORITHM, CodebookUsage, LossBreakdown, VectorQuantizer,
                      VectorQuantizerEMA, kmeans)
from .residual_lookup_free import ResidualFSQ, ResidualLFQ
from .residual_vq import ResidualVQ
from .multiscale_vq import MultiScaleResidualVQ
from .sim_vq import SimVQ
from .ibq import IndexBackpropVQ
from .patch import PatchReport, patch, unpatch

__version__ = "0.1.0"

__all__ = ["VectorQuantizer", "VectorQuantizerEMA", "nearest_code", "VQVAE", "Encoder", "Decoder",
           "Residual", "ResidualStack", "CodebookUsage", "kmeans", "FSQ", "LFQ", "ResidualVQ",
           "ORIGINAL_ALGORITHM", "LossBreakdown", "SimVQ",
           "IndexBackpropVQ", "ResidualFSQ", "ResidualLFQ", "MultiScaleResidualVQ",
           "patch", "unpatch", "PatchReport", "export_decompositions",
           "__version__"]
