"""Build triton's host launchers (C extensions) into triton's cache, under the Python and
the triton of the GPU machine. Run by ``benchmarks.gpu.cache build`` with that Python; it
needs triton alone (no torch, no CUDA driver: ``TRITON_LIBCUDA_PATH`` names a stand-in
``libcuda.so.1`` to link against; the GPU's own is loaded at run time).

    python3.12 benchmarks/gpu/_launchers.py JOBS.json    # TRITON_CACHE_DIR set

JOBS.json: a list of launcher sources (``make_launcher``'s C code; empty for a triton with
one launcher for every kernel, in its driver's utilities, which are built too).
"""

import json
import sys


def main(jobs_file: str) -> int:
    from triton.backends.nvidia import driver
    from triton.runtime.build import compile_module_from_src
    built = 0
    for source in json.loads(open(jobs_file).read()):
        _built_not_loaded(lambda: compile_module_from_src(
            src=source, name="__triton_launcher", library_dirs=driver.library_dirs(),
            include_dirs=driver.include_dirs, libraries=driver.libraries))
        built += 1
    # the driver's own utilities, which triton builds the first time it touches a GPU
    _built_not_loaded(driver.CudaUtils)
    print(json.dumps({"launchers": built}))
    return 0


def _built_not_loaded(build) -> None:
    """Run ``build``; a module built and cached but not loadable without the real CUDA
    driver (its ``cu*`` symbols) is what is wanted here."""
    try:
        build()
    except ImportError as error:
        if "undefined symbol: cu" not in str(error):
            raise


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
