"""The oracles: every quantizer written plainly from its paper (or, for the original
notebook's, from the notebook with its bugs fixed), in plain torch with ``[N, K]`` distance
matrices and autograd. Every fast path is tested against these, never against itself; do
not optimise them. One module per family, as ``vqfast.kernels`` and ``vqfast._torch``.

Every module here is imported and its public functions, classes and constants exported
under their names (``vqfast.reference.residual_vq``...): a new family's file needs no edit here. (A
family module is not named as a function it exports: ``residual.py`` holds ``residual_vq``.)
"""

import importlib
import inspect
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    globals().update({name: obj for name, obj in vars(_module).items()
                      if not name.startswith("_") and (name.isupper() or (
                          (inspect.isfunction(obj) or inspect.isclass(obj))
                          and obj.__module__ == _module.__name__))})
del importlib, inspect, pkgutil
