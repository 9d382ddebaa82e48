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

import importlib
import inspect
import pkgutil

# Every family module here is imported and its public functions exported under their names
# (an op finds its torch implementation by name): a new family's file needs no edit here.
for _info in pkgutil.iter_modules(__path__):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    globals().update({name: fn for name, fn in vars(_module).items()
                      if not name.startswith("_") and inspect.isfunction(fn)
                      and fn.__module__ == _module.__name__})
