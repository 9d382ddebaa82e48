"""Compile the kernels the benchmarks' training steps launch, before they launch them, on
every core at once.

Triton's JIT compiles a kernel the first time a launch needs it, one at a time, inside the
timed parts. This records each step's launches on CPU stand-in tensors (the
specialisations triton's JIT would build, through triton's own binder:
``benchmarks.host.record_specializations``), compiles them in a process pool into
triton's on-disk cache (``TRITON_CACHE_DIR``), with their host launchers where a CUDA
driver is present. ``--check`` then looks every recorded kernel up again with triton's
front end replaced by an error (a miss fails, named), and on a GPU runs each step once on
the device with the front end disabled for every launch: a launch whose kernel the
recording missed (a specialisation the CPU stand-ins did not reproduce) fails, naming the
step.

    python -m benchmarks.gpu.precompile                  # every step, every core
    python -m benchmarks.gpu.precompile --check          # ... then prove the cache hits
    python -m benchmarks.gpu.precompile --steps vqvae    # the VQ-VAE shape's steps only
"""

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("benchmarks.gpu.precompile needs TRITON_INTERPRET unset (it compiles kernels)")


def steps(which: str) -> list:
    """The training steps whose launches are compiled: those of ``benchmarks.gpu.model``
    (the benchmarks' shapes and dtypes) and of the ahead-of-time test."""
    from benchmarks.gpu.model import STEPS
    from benchmarks.host import RECORDED_STEPS
    chosen = list({s[0]: s for s in STEPS + RECORDED_STEPS}.values())
    return [s for s in chosen if which == "all" or s[0].startswith("VQ-VAE")]


def target():
    """The GPU's own target where there is one; sm_90 (H100, H200) otherwise."""
    from triton.backends.compiler import GPUTarget
    if torch.cuda.is_available():
        from triton.runtime import driver
        return driver.active.get_current_target()
    return GPUTarget("cuda", 90, 32)


class Miss(Exception):
    """A launch that would compile: its kernel is not in the cache."""


def look_up(spec: dict, gpu) -> tuple:
    """``(source, compiled)``: ``spec``'s kernel as triton finds it in its cache for ``gpu``;
    raises ``Miss``, naming it, where triton would compile it."""
    from benchmarks.host import compile_recorded, recorded_source
    source = recorded_source(spec)

    def miss(*args, **kwargs):  # triton reaches its front end only on a cache miss
        raise Miss(f"{spec['kernel']} for {', '.join(spec['cases'])} is not in the cache")
    source.make_ir = miss
    return source, compile_recorded(spec, gpu, source)


def compile_one(job) -> tuple:
    """``(kernel, seconds, error or None, compiled here)``: ``spec`` compiled for ``gpu`` as
    triton's JIT compiles it, or found in the cache (with ``check``, only looked up); with
    ``launchers``, its host launcher built too (a C extension: needs the CUDA driver)."""
    from benchmarks.host import compile_recorded, recorded_source
    spec, gpu, check, launchers = job
    compiled_here = []
    start = time.perf_counter()
    try:
        if check:
            look_up(spec, gpu)
            return spec["kernel"], time.perf_counter() - start, None, False
        source = recorded_source(spec)
        make_ir = source.make_ir

        def front_end(*args, **kwargs):  # triton reaches its front end only on a cache miss
            compiled_here.append(True)
            return make_ir(*args, **kwargs)
        source.make_ir = front_end
        compiled = compile_recorded(spec, gpu, source)
        if launchers:  # its host launcher: a C extension
            from triton.runtime import driver
            driver.active.launcher_cls(source, compiled.metadata)
    except Exception as error:  # report every failure, not just the first
        return (spec["kernel"], time.perf_counter() - start,
                f"{type(error).__name__}: {error}"[:500], bool(compiled_here))
    return spec["kernel"], time.perf_counter() - start, None, bool(compiled_here)


def run(specs: list, gpu, jobs: int, check: bool, launchers: bool = False) -> list:
    # (spawned, not forked: the parent may hold a CUDA context)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(compile_one, [(spec, gpu, check, launchers) for spec in specs]))


def device_check(chosen: list) -> list:
    """Each step run once on the GPU (and once more after its k-means start) with triton's
    front end disabled: the errors of the steps whose launches missed the cache."""
    from triton.compiler import ASTSource
    from benchmarks.host import _step, step_inputs
    failed, make_ir = [], ASTSource.make_ir

    def miss(source, *args, **kwargs):
        raise Miss(f"{source.fn.__name__}: not in the cache")
    ASTSource.make_ir = miss
    try:
        for name, build, shape, dtype in chosen:
            module, x = step_inputs(build, shape, dtype, "cuda")
            try:
                grads = [None, None]
                for _ in range(2):
                    _step(module, x, grads)
                torch.cuda.synchronize()
            except Exception as error:  # a miss surfaces from inside the step
                failed.append(f"{name}: {type(error).__name__}: {error}"[:500])
    finally:
        ASTSource.make_ir = make_ir
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", choices=("all", "vqvae"), default="all")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="processes (default: every core)")
    parser.add_argument("--check", action="store_true",
                        help="then look every launch up again: exit 1 on a miss")
    args = parser.parse_args(argv)
    from benchmarks.host import record_specializations
    chosen = steps(args.steps)
    specs = record_specializations(chosen)
    gpu = target()
    start = time.perf_counter()
    results = run(specs, gpu, args.jobs, check=False, launchers=torch.cuda.is_available())
    failed = [f"{name}: {error}" for name, _, error, _ in results if error]
    slowest = max(results, key=lambda r: r[1])
    here = sum(compiled_here for *_, compiled_here in results)
    print(f"precompiled {len(results) - len(failed)} of {len(results)} kernel specialisations for "
          f"{gpu.backend} sm_{gpu.arch} in {time.perf_counter() - start:.1f} s on {args.jobs} "
          f"processes (slowest: {slowest[0]}, {slowest[1]:.1f} s): {here} compiled here, "
          f"{len(results) - here} found in triton's cache")
    if args.check:
        misses = [error for _, _, error, _ in run(specs, gpu, args.jobs, check=True) if error]
        print(f"cache check: {len(specs) - len(misses)} of {len(specs)} launches hit the cache")
        failed += misses
        if torch.cuda.is_available():
            missed = device_check(chosen)
            print(f"device check: {len(chosen) - len(missed)} of {len(chosen)} steps ran on the "
                  f"GPU without compiling")
            failed += missed
        else:
            print("device check: no CUDA device (the recorded launches only)")
    for line in failed:
        print(line, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
