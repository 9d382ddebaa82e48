"""Triton kernels of vqfast, one fused op per file, each with its launcher.

Same signatures as the torch backend (``vqfast._torch``). CUDA tensors, or CPU tensors
under the Triton interpreter (``TRITON_INTERPRET=1`` set before import).

The registries build themselves: every module here (but the ``_`` helpers) is imported;
its ``@launcher`` functions are exported under their names (``_launch.LAUNCHERS``), and
the modules that list their launchable configurations (``aot_variants()``) make
``KERNEL_MODULES``, which the ahead-of-time test compiles for both targets. A module with a
``@triton.jit`` kernel and no ``aot_variants()``, or a kernel it launches missing from
them, fails ``tests/test_launch.py``.
"""

import importlib
import pkgutil

from . import _launch

_MODULES = {info.name: importlib.import_module(f"{__name__}.{info.name}")
            for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")}
KERNEL_MODULES = tuple(sorted(name for name, module in _MODULES.items()
                              if hasattr(module, "aot_variants")))
globals().update(_launch.LAUNCHERS)

__all__ = sorted(_launch.LAUNCHERS) + ["KERNEL_MODULES"]
