"""One spec per quantizer: how to build it small and odd, its inputs, its outputs, its
oracle. The shared tests (``tests/test_registry.py``) loop over ``SPECS``; a quantizer
exported by ``vqfast`` without a spec, or a spec whose oracle is missing, fails there.
"""

import dataclasses
from typing import Callable

import torch

import vqfast


@dataclasses.dataclass(frozen=True)
class Spec:
    """``build(backend)``: the module with small odd options. ``channels``: D of its
    inputs ``[B, D, H, W]``. ``oracle``: the ``vqfast.reference`` function written from
    the paper, and ``oracle_tests`` the test file that holds the module to it. ``loss``:
    whether ``forward`` returns ``(loss, quantized, perplexity, codes)`` (else
    ``(quantized, codes)``). ``learned``: whether a training step changes its state."""

    cls: type
    build: Callable
    channels: int
    oracle: str
    oracle_tests: str
    loss: bool = True
    learned: bool = True

    @property
    def name(self) -> str:
        return self.cls.__name__

    def inputs(self, seed: int = 0) -> torch.Tensor:
        return torch.randn(2, self.channels, 5, 5, generator=torch.Generator().manual_seed(seed))

    def quantized(self, outputs):
        return outputs[1] if self.loss else outputs[0]

    def codes(self, outputs):
        return outputs[-1]

    def training_loss(self, outputs):
        q = self.quantized(outputs)
        return q.square().mean() + (outputs[0] if self.loss else 0)


SPECS = [
    Spec(vqfast.VectorQuantizer, lambda b: vqfast.VectorQuantizer(13, 6, backend=b), 6,
         "VectorQuantizer", "test_modules.py"),
    Spec(vqfast.VectorQuantizerEMA, lambda b: vqfast.VectorQuantizerEMA(13, 6, backend=b), 6,
         "VectorQuantizerEMA", "test_modules.py"),
    Spec(vqfast.ResidualVQ, lambda b: vqfast.ResidualVQ(3, 13, 6, backend=b), 6,
         "residual_vq", "test_residual.py"),
    Spec(vqfast.FSQ, lambda b: vqfast.FSQ([3, 5, 4], backend=b), 3, "fsq",
         "test_lookup_free.py", loss=False, learned=False),
    Spec(vqfast.LFQ, lambda b: vqfast.LFQ(5, backend=b), 5, "lfq", "test_lookup_free.py",
         learned=False),
    Spec(vqfast.ResidualFSQ, lambda b: vqfast.ResidualFSQ([3, 5, 4], 2, backend=b), 3,
         "residual_fsq", "test_residual_lookup_free.py", loss=False, learned=False),
    Spec(vqfast.ResidualLFQ, lambda b: vqfast.ResidualLFQ(5, 2, backend=b), 5,
         "residual_lfq", "test_residual_lookup_free.py", learned=False),
    Spec(vqfast.SimVQ, lambda b: vqfast.SimVQ(13, 6, backend=b), 6, "simvq",
         "test_sim_vq.py"),
    Spec(vqfast.IndexBackpropVQ, lambda b: vqfast.IndexBackpropVQ(13, 6, backend=b), 6, "ibq",
         "test_ibq.py"),
    Spec(vqfast.MultiScaleResidualVQ,
         lambda b: vqfast.MultiScaleResidualVQ(13, 6, scales=(1, 2, 5), backend=b), 6,
         "multiscale_residual_vq", "test_multiscale.py"),
]
