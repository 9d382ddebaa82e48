"""vqfast benchmark suite: ``python -m benchmarks --help``."""

import os as _os

if _os.environ.get("VQFAST_COMPILE_LOG"):  # the GPU command: what triton builds, by part
    from .gpu import compile_log as _compile_log
    _compile_log.install()
