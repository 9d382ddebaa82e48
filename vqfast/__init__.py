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


def _quantizer_classes() -> dict:
    """Every quantizer class of the modules under ``vqfast/`` (public subclasses of
    ``QuantizerCommon`` defined there): exported with no edit here, so a new family's
    module is its own registration."""
    import importlib
    import pkgutil

    from .quantizer_base import QuantizerCommon
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.update({name: obj for name, obj in vars(module).items()
                      if isinstance(obj, type) and issubclass(obj, QuantizerCommon)
                      and obj is not QuantizerCommon and not name.startswith("_")
                      and obj.__module__ == module.__name__})
    return found


_QUANTIZERS = _quantizer_classes()
globals().update(_QUANTIZERS)

__all__ = ["VectorQuantizer", "VectorQuantizerEMA", "nearest_code", "VQVAE", "Encoder", "Decoder",
           "Residual", "ResidualStack", "CodebookUsage", "kmeans", "FSQ", "LFQ", "ResidualVQ",
           "ORIGINAL_ALGORITHM", "LossBreakdown", "SimVQ",
           "IndexBackpropVQ", "ResidualFSQ", "ResidualLFQ", "MultiScaleResidualVQ",
           "patch", "unpatch", "PatchReport", "export_decompositions",
           "__version__"]
__all__ += sorted(set(_QUANTIZERS) - set(__all__))
