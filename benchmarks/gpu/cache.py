"""A Triton cache for a GPU machine, built on a CPU machine, so that the GPU command
compiles nothing on the GPU.

Triton keys its on-disk cache by its own build (``triton_key()``: its Python files and the
bytes of its ``libtriton.so``, which differ between Python versions), the kernel's
specialisation, the target and the options; the host launchers are C extensions keyed by
their source and named for the Python that loads them. So the cache is built for one
triton version, one Python and one GPU architecture:

- the kernels: the specialisations the GPU command's training steps launch, recorded on
  CPU stand-ins through triton's own binder (``benchmarks.host.record_specializations``),
  compiled here by this machine's triton (the same version as the GPU's: its Python code
  and compiler are the GPU's, only the Python binding differs) under the GPU triton's cache
  key, for ``--arch`` (sm_90: H100, H200); intermediate IRs dropped, the cubins and their
  metadata kept;
- the launchers and triton's driver utilities: built by ``--python`` (the GPU machine's
  Python version with the GPU's triton importable, e.g. via ``--python-path``) with its own
  ``compile_module_from_src``, linked against a stand-in ``libcuda.so.1``.

    python -m benchmarks.gpu.cache build --python python3.12 --python-path DIR  # .triton-cache/
    python -m benchmarks.gpu.cache check          # every recorded launch hits it (no GPU)
    python -m benchmarks.gpu.cache install DEST   # on the GPU machine: DEST is then the cache
    python -m benchmarks.gpu.cache harvest DEST OUT/triton-cache-new.tar.gz   # after the run
    python -m benchmarks.gpu.cache merge triton-cache-new.tar.gz   # back here: add it

``check`` and ``build`` need this machine's triton at the cache's version first on the
path (``--triton-path``). ``install`` copies the cache to DEST with its paths rewritten
(triton's cache groups name their files by absolute path) and says whether this machine's
triton is the build it was made for. ``benchmarks/gpu/run.sh`` installs ``.triton-cache``
when it is there and its ``--dry-run`` checks it.
"""

import argparse
import contextlib
import datetime
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / ".triton-cache"
# The GPU command's correctness part (benchmarks/gpu/run.sh reads it from here): the
# kernels against the oracle, the 2**31 cases, the launchers' limits, the sync-debug and
# CUDA-graph steps.
CORRECTNESS = ["tests/test_cuda.py", "tests/test_kernels.py", "tests/test_launch.py",
               "tests/test_residual.py", "tests/test_residual_lookup_free.py",
               "tests/test_multiscale.py", "tests/test_ibq.py", "-m", "not slow",
               "-k", "not property"]
KEEP = (".json", ".cubin")  # what a cache hit reads: the metadata and the binary
QUERY = ("import json, sys, sysconfig, triton\n"
         "from triton.runtime.cache import triton_key\n"
         "from triton.runtime.build import platform_key\n"
         "print(json.dumps({'triton': triton.__version__, 'key': triton_key(),\n"
         "                  'python': '%d.%d' % sys.version_info[:2],\n"
         "                  'ext_suffix': sysconfig.get_config_var('EXT_SUFFIX'),\n"
         "                  'platform': platform_key()}))\n")


def _use_key(key) -> None:
    """In a worker: compile under ``key`` (the GPU triton's ``triton_key()``)."""
    if key:
        import triton.runtime.cache
        triton.runtime.cache.triton_key = lambda: key


def _pool(jobs: int, key):
    # (spawned, not forked: the parent has imported torch)
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_use_key, initargs=(key,))


def launcher_source(source, metadata) -> str:
    """The C source of ``source``'s host launcher, as triton's ``CudaLauncher`` writes it;
    None for a triton whose one launcher, in its driver's utilities, serves every kernel."""
    from triton.backends.nvidia import driver
    if not hasattr(driver, "make_launcher"):
        return None
    names = source.fn.arg_names
    constants = {((names.index(i),) if isinstance(i, str) else i): v
                 for i, v in source.constants.items()}
    return driver.make_launcher(constants, dict(source.signature),
                                getattr(metadata, "tensordesc_meta", None))


def _build_one(job) -> str:
    """``spec`` compiled into the cache: its launcher's source (see ``launcher_source``)."""
    from benchmarks.host import compile_recorded, recorded_source
    spec, gpu = job
    source = recorded_source(spec)
    return launcher_source(source, compile_recorded(spec, gpu, source))


def _launcher_key(source: str, platform: str) -> str:
    """Where triton's ``compile_module_from_src`` caches a C extension."""
    from triton.runtime.cache import _base32
    return _base32(hashlib.sha256((source + platform).encode("utf-8")).hexdigest())


def regroup(cache: Path, keep=None) -> int:
    """Point every cache group of ``cache`` at its files where they now are (triton writes
    absolute paths), keeping only the files ending in ``keep`` if given (the others are
    deleted). Returns the number of groups."""
    groups = list(cache.glob("*/__grp__*.json"))
    for group in groups:
        children = json.loads(group.read_text())["child_paths"]
        kept = {}
        for name, path in children.items():
            here = group.parent / Path(path).name
            if keep is None or name.endswith(keep):
                kept[name] = str(here)
            elif here.exists():
                here.unlink()
        group.write_text(json.dumps({"child_paths": kept}))
    return len(groups)


@contextlib.contextmanager
def _recording(part: str, *patches):
    """Launches stubbed and recorded, the part's printing silenced, ``patches`` applied;
    yields ``(specs, failed)``: after the block, ``specs`` holds the part's specialisations
    (``failed``, lines the block added, fails it instead)."""
    from benchmarks.host import StubbedLaunches
    launches, specs, failed = StubbedLaunches(record=True), [], []
    with contextlib.ExitStack() as stack:
        for context in (launches.stubbed(), contextlib.redirect_stdout(io.StringIO()), *patches):
            stack.enter_context(context)
        yield specs, failed
    if failed:
        raise RuntimeError(f"the {part}'s cases failed on CPU stand-ins: {failed}")
    specs += [dict(spec, cases=[part]) for spec in launches.recorded.values()]


def record_bench() -> list:
    """The specialisations the GPU command's bench part launches (``python -m benchmarks
    --headline``, ``benchmarks.atomics``: vqfast's Triton path at their shapes and dtypes),
    from their own code on CPU stand-ins, launches stubbed and each case run once."""
    import torch

    from benchmarks import atomics, suite
    cpu = torch.device("cpu")

    def once(fn, device):
        fn()
        return 1.0
    shapes, dtypes = [suite.SEED, suite.LARGE], [torch.bfloat16, torch.float32]
    with _recording("bench part", mock.patch.object(suite, "median_seconds", once),
                    mock.patch.object(suite, "peak_extra_bytes", once),
                    mock.patch.object(atomics, "median_seconds", once)) as (specs, failed):
        rows = suite.run(shapes, ["nearest", "ema_step"], ["vqfast[triton]"], cpu, dtypes,
                         progress=lambda line: None) + atomics.run(shapes, dtypes, cpu)
        failed += [r for r in rows if r.skipped]
    return specs


def _once(fn, *args, **kwargs):
    """A timing function's stand-in while recording: the call once, a time of 1."""
    fn()
    return 1.0


def record_family(models: bool = True) -> list:
    """The specialisations the GPU command's family part launches through vqfast's own
    benchmarks (residual, encode, SimVQ, IBQ, residual FSQ / LFQ, multi-scale, LFQ / BSQ /
    FSQ) and, with ``models``, through the models others wrote (``benchmarks.patched``,
    ``benchmarks.codecs``: those whose library is installed here), from their own code at
    the cases, dtypes and implementations they take on CUDA, on CPU stand-ins: launches
    stubbed, ``auto`` resolving to Triton as it does for CUDA tensors, each case run once
    (vector-quantize-pytorch's not at all)."""
    import torch

    from benchmarks import (codecs, encode, ibq, lookup_free, multiscale, patched, residual,
                            residual_lookup_free, sim_vq)
    from vqfast.ops import dispatch
    cpu, failed = torch.device("cpu"), []

    def once(row, make_step, device):  # (measure_into's stand-in: a row the run can report)
        row.skipped = "not recorded"
        if row.impl.startswith("vqfast"):
            try:
                make_step()()
                row.median_ms, row.peak_mib, row.skipped = 1.0, 0.0, None
            except LookupError as reason:  # a case the benchmark itself skips
                row.skipped = str(reason)
            except Exception as error:  # (all reported at the end)
                failed.append(f"{row.impl}: {type(error).__name__}: {error}"[:300])
    runs = [
        (residual, lambda: residual.run(residual.CASES, cpu)),
        (encode, lambda: encode.run(encode.CASES, cpu, (torch.float32, torch.bfloat16))),
        (sim_vq, lambda: sim_vq.run(sim_vq.CASES, cpu)),
        (ibq, lambda: ibq.run(ibq.CUDA_CASES, cpu, 0)),  # (budget 0: the [N, K] one skipped)
        (residual_lookup_free, lambda: residual_lookup_free.run(residual_lookup_free.CASES, cpu)),
        (multiscale, lambda: multiscale.run(multiscale.CASES, cpu)),
    ]
    timed = [mock.patch.object(module, name, _once)
             for module, names in ((lookup_free, ("median_seconds", "peak_extra_bytes")),
                                   (patched, ("median_seconds", "one_call_seconds",
                                              "peak_extra_bytes")),
                                   (codecs, ("median_seconds", "one_call_seconds",
                                             "peak_extra_bytes")))
             for name in names]
    every_impl = {**residual.IMPLS, **residual.CUDA_IMPLS}
    with _recording("family part",
                    mock.patch.object(dispatch, "_auto_backend", lambda device: "triton"),
                    mock.patch.object(residual, "IMPLS", every_impl),
                    mock.patch.object(lookup_free, "_peer", lambda *args: None),
                    *timed) as (specs, errors):
        for module, go in runs:
            with mock.patch.object(module, "measure_into", once):
                go()
        # the plain LFQ benchmark at its defaults (python -m benchmarks.lookup_free)
        options = lookup_free.parse_args([])
        rows = (lookup_free.lfq_cases(options.dims, options.n, cpu, progress=_quiet)
                + lookup_free.lfq_cases(options.bsq_dims, options.n, cpu, progress=_quiet,
                                        kind="bsq")
                + lookup_free.fsq_cases(options.n, cpu, progress=_quiet))
        errors += failed + [f"lookup_free {r.quantizer} d={r.d}: {r.skipped}" for r in rows
                            if r.impl.startswith("vqfast") and r.skipped]
        if models:
            for module in (patched, codecs):
                for row in module.run(False, cpu, progress=_quiet):
                    if row.skipped and row.skipped != "library not installed":
                        errors.append(f"{module.__name__} {row.case}: {row.skipped}")
    return specs


def _quiet(line: str) -> None:
    pass


def record_train(dry_run: bool = False) -> list:
    """The specialisations the GPU command's train and quality parts launch, from their own
    code at their own sizes on CPU stand-ins (launches stubbed, ``auto`` resolving to
    Triton): ``benchmarks.train``'s VQ-VAE training step (its k-means step, then a steady
    one: the compiled, graphed and quantizer-only steps launch the same), and each of the
    quality part's configurations (``benchmarks.quality`` at the batch the train part gives
    it): two training steps and the evaluation of the test crops. ``dry_run``: the
    CPU-sized options of ``--dry-run`` (a quick check of this recording)."""
    import torch

    from benchmarks import quality, train
    from vqfast.ops import dispatch
    cpu = torch.device("cpu")
    args = train.parse_args(["--out", os.devnull, *(["--dry-run"] if dry_run else [])])
    qargs = quality.parse_args(["--quick"] if dry_run else [])
    qargs.steps, qargs.seeds, qargs.log_every = 2, [0], 1
    if not dry_run:
        qargs.batch_size = train.QUALITY_BATCH
    with _recording("train part",
                    mock.patch.object(dispatch, "_auto_backend", lambda device: "triton")) as (
                        specs, failed):
        model = train._model(args, cpu)
        opt = train._optimizer(model, cpu)
        for x in train.batches_for(args, cpu)[:2]:
            train._step(model, opt, x)
        crops = quality.load_crops()
        for config in quality.CONFIGS:
            if not config.startswith("vector-quantize-pytorch"):
                quality.train_one(config, crops, qargs, 0, cpu)
    return specs


def _recorded_specs(which: str, only=None, tests=()) -> list:
    """The specialisations of the training steps and of the bench, family, train and quality
    parts (recorded now) and ``tests``' (recorded by ``record_tests``), each once."""
    from benchmarks.gpu.precompile import steps
    from benchmarks.host import record_specializations
    specs = {}
    recorded = record_specializations(steps(which)) + (
        record_bench() + record_family() + record_train() if which == "all" else [])
    for spec in recorded + list(tests):
        key = repr([spec[k] for k in ("kernel", "signature", "constexprs", "attrs", "options")])
        if key in specs:
            specs[key]["cases"] = specs[key]["cases"] + spec["cases"]
        else:
            specs[key] = spec
    return [s for s in specs.values() if not only or s["kernel"] in only]


def record_tests(out: Path, test_path=None) -> list:
    """The specialisations the GPU command's test selection launches, recorded from a run
    of it under the Triton interpreter (``benchmarks.gpu.specializations``) with
    ``test_path`` first on the path; the tests that need a GPU skip here (their launches
    compile on the GPU)."""
    env = dict(os.environ, TRITON_INTERPRET="1", VQFAST_RECORD_SPECIALIZATIONS=str(out))
    if test_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(test_path).resolve()),
                                                        env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "benchmarks.gpu.specializations", "-rs", *CORRECTNESS],
                          env=env, cwd=REPO, capture_output=True, text=True)
    if "the Triton interpreter fails here" in proc.stdout:
        sys.exit("the test selection cannot run under this triton's interpreter (triton 3.6 "
                 "needs numpy < 2.4): put one first on the path with --test-path")
    if proc.returncode:
        sys.exit(f"the test selection failed under the interpreter:\n{proc.stdout[-3000:]}")
    return pickle.loads(out.read_bytes())


def _gpu(arch: int):
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", arch, 32)


def _stand_in_libcuda(folder: str) -> None:
    """An empty ``libcuda.so.1`` to link the launchers against (the GPU's is loaded)."""
    src = os.path.join(folder, "empty.c")
    Path(src).write_text("")
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o",
                    os.path.join(folder, "libcuda.so.1"), src], check=True)


def build(args) -> int:
    import triton
    env = dict(os.environ)
    if args.python_path:
        env["PYTHONPATH"] = args.python_path
    env.pop("TRITON_INTERPRET", None)
    query = subprocess.run([*shlex.split(args.python), "-c", QUERY], env=env, text=True,
                           capture_output=True)
    if query.returncode:
        sys.exit(f"--python could not import triton:\n{query.stderr[-2000:]}")
    target = json.loads(query.stdout.strip().splitlines()[-1])
    if target["triton"] != triton.__version__:
        sys.exit(f"the GPU's triton is {target['triton']}, this one {triton.__version__}: "
                 f"put triton {target['triton']} first on the path (--triton-path)")
    from triton.runtime.cache import triton_key
    ours, theirs = triton_key().split("-"), target["key"].split("-")
    if len(ours) != len(theirs) or sum(a != b for a, b in zip(ours, theirs)) > 1:
        # (its key hashes its Python files and libtriton's bytes: only the last,
        # the Python binding, may differ)
        sys.exit("the GPU's triton differs from this one beyond its Python binding: its "
                 "kernels compiled here would not be its own")
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    os.environ["TRITON_CACHE_DIR"] = str(out)
    start = time.perf_counter()
    tests = [] if args.no_tests else record_tests(out / "tests.pkl", args.test_path)
    specs = _recorded_specs(args.steps, args.only, tests)
    gpu = _gpu(args.arch)
    with _pool(args.jobs, target["key"]) as pool:
        built = list(pool.map(_build_one, [(spec, gpu) for spec in specs]))
    kernels_s = time.perf_counter() - start
    launchers = sorted({source for source in built if source is not None})
    with tempfile.TemporaryDirectory() as scratch:
        _stand_in_libcuda(scratch)
        jobs = os.path.join(scratch, "launchers.json")
        Path(jobs).write_text(json.dumps(launchers))
        env.update(TRITON_CACHE_DIR=str(out), TRITON_LIBCUDA_PATH=scratch)
        subprocess.run([*shlex.split(args.python), str(Path(__file__).with_name("_launchers.py")),
                        jobs], env=env, check=True, stdout=subprocess.DEVNULL)
    groups = regroup(out, keep=KEEP)
    manifest = {
        "triton": target["triton"], "triton_key_sha256": hashlib.sha256(
            target["key"].encode()).hexdigest(), "triton_key": target["key"],
        "python": target["python"], "ext_suffix": target["ext_suffix"],
        "platform": target["platform"], "arch": f"sm_{args.arch}",
        "built": datetime.date.today().isoformat(), "steps": args.steps, "only": args.only,
        "tests": len(tests), "kernels": len(specs), "launchers": len(launchers),
        "specialisations": [{"kernel": s["kernel"], "cases": s["cases"]} for s in specs]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"built {groups} kernel specialisations ({len(tests)} from the GPU command's tests) "
          f"in {kernels_s:.0f} s on {args.jobs} processes "
          f"and {len(launchers)} launchers for triton {target['triton']} "
          f"Python {target['python']} sm_{args.arch} into {out}: "
          f"{size / 2**20:.1f} MiB")
    return 0


def _check_one(job) -> str:
    """None if ``spec``'s kernel and its launcher hit the cache, else what missed."""
    from benchmarks.gpu.precompile import Miss, look_up
    spec, gpu, manifest = job
    try:
        source, compiled = look_up(spec, gpu)
    except Miss as error:
        return str(error)
    launcher = launcher_source(source, compiled.metadata)
    if launcher is None:
        return None
    path = Path(os.environ["TRITON_CACHE_DIR"], _launcher_key(launcher, manifest["platform"]),
                f"__triton_launcher{manifest['ext_suffix']}")
    return (None if path.exists() else
            f"{spec['kernel']} for {', '.join(spec['cases'])}: its launcher is not in the cache")


def check(args) -> int:
    """Every launch the recorded steps make, looked up in a copy of the cache as the GPU's
    triton would look it up: a kernel or launcher missing fails, named."""
    import triton
    cache = Path(args.cache)
    manifest_file = cache / "manifest.json"
    if not manifest_file.exists():
        print(f"no carried Triton cache at {cache} (python -m benchmarks.gpu.cache build)")
        return 0 if args.optional else 1
    manifest = json.loads(manifest_file.read_text())
    if manifest["triton"] != triton.__version__:
        print(f"carried Triton cache at {cache} not checked: it is for triton "
              f"{manifest['triton']}, this one is {triton.__version__} (put that version "
              f"first on the path: --triton-path)", file=sys.stderr)
        return 0 if args.optional else 1
    with tempfile.TemporaryDirectory() as copy:
        install_to(cache, Path(copy) / "cache")
        os.environ["TRITON_CACHE_DIR"] = str(Path(copy) / "cache")
        tests = cache / "tests.pkl"
        specs = _recorded_specs(manifest["steps"], manifest["only"],
                                pickle.loads(tests.read_bytes()) if tests.exists() else ())
        gpu = _gpu(int(manifest["arch"].removeprefix("sm_")))
        with _pool(args.jobs, manifest["triton_key"]) as pool:
            misses = [m for m in pool.map(_check_one, [(s, gpu, manifest) for s in specs]) if m]
    print(f"carried Triton cache ({manifest['triton']}, "
          f"Python {manifest['python']}, {manifest['arch']}, built "
          f"{manifest['built']}): {len(specs) - len(misses)} of {len(specs)} recorded kernel "
          f"specialisations hit it, each with its launcher")
    for miss in misses:
        print(miss, file=sys.stderr)
    return 1 if misses else 0


def install_to(cache: Path, dest: Path) -> dict:
    """``cache`` copied into ``dest`` (beside what a warm machine already has there), every
    group pointing at its files where they now are."""
    shutil.copytree(cache, dest, dirs_exist_ok=True)
    regroup(dest)
    return json.loads((dest / "manifest.json").read_text())


def install(args) -> int:
    """Copy the cache to DEST for this machine's triton; say whether it is the build the
    cache was made for (if not, every kernel will miss and compile here)."""
    cache = Path(args.cache)
    if not (cache / "manifest.json").exists():
        print(f"no carried Triton cache at {cache}: kernels compile on this machine")
        return 0
    manifest = install_to(cache, Path(args.dest))
    if _triton_key_sha256() == manifest["triton_key_sha256"]:
        print(f"carried Triton cache installed in {args.dest}: {manifest['kernels']} kernel "
              f"specialisations and {manifest['launchers']} launchers for this triton "
              f"({manifest['triton']}, {manifest['arch']})")
    else:
        print(f"carried Triton cache installed in {args.dest}, but it was built for another "
              f"triton build ({manifest['triton']}, Python {manifest['python']}): its kernels "
              f"will miss and compile here")
    return 0


def _triton_key_sha256() -> str:
    from triton.runtime.cache import triton_key
    return hashlib.sha256(triton_key().encode()).hexdigest()


def harvest(args) -> int:
    """On the GPU machine, after the run: what triton compiled there (the cache's entries
    the carried cache lacks), as a tarball to bring back and ``merge`` (the next run then
    compiles none of it)."""
    import tarfile
    cache, carried = Path(args.cache_dir), Path(args.carried)
    new = sorted(d for d in cache.iterdir() if d.is_dir()
                 and not (carried / d.name).exists()) if cache.is_dir() else []
    if not new:
        print(f"harvest: nothing compiled outside the carried cache in {cache}")
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / "cache"
        staged.mkdir()
        for entry in new:
            shutil.copytree(entry, staged / entry.name)
        regroup(staged, keep=KEEP)
        (staged / "harvest.json").write_text(json.dumps(
            {"triton_key_sha256": _triton_key_sha256(), "entries": len(new),
             "date": datetime.date.today().isoformat()}))
        with tarfile.open(args.tarball, "w:gz") as tar:
            tar.add(staged, arcname="cache")
    size = Path(args.tarball).stat().st_size
    print(f"harvest: {len(new)} cache entries compiled on this machine -> {args.tarball} "
          f"({size / 2**20:.1f} MiB; python -m benchmarks.gpu.cache merge it)")
    return 0


def merge(args) -> int:
    """Add a GPU run's ``harvest`` to the carried cache (built for the same triton)."""
    import tarfile
    cache = Path(args.cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as scratch:
        with tarfile.open(args.tarball) as tar:
            tar.extractall(scratch, filter="data")
        staged = Path(scratch) / "cache"
        harvested = json.loads((staged / "harvest.json").read_text())
        if harvested["triton_key_sha256"] != manifest["triton_key_sha256"]:
            sys.exit("this harvest comes from another triton build than the cache's")
        added = 0
        for entry in staged.iterdir():
            if entry.is_dir() and not (cache / entry.name).exists():
                shutil.copytree(entry, cache / entry.name)
                added += 1
    regroup(cache)
    manifest["harvested"] = manifest.get("harvested", 0) + added
    (cache / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"merged {added} cache entries compiled on a GPU into {cache}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="build the cache (CPU machine)")
    b.add_argument("--python", required=True,
                   help="the GPU machine's Python (a command), which imports the GPU's triton")
    b.add_argument("--python-path", help="PYTHONPATH for --python (where that triton is)")
    b.add_argument("--out", default=str(DEFAULT))
    b.add_argument("--arch", type=int, default=90, help="compute capability (default 90)")
    b.add_argument("--steps", choices=("all", "vqvae"), default="all")
    b.add_argument("--only", action="append", metavar="KERNEL",
                   help="only this kernel's specialisations (repeatable)")
    b.add_argument("--no-tests", action="store_true",
                   help="the training steps' launches only, not the test selection's")
    b.add_argument("--test-path", help="a folder first on the path for the test selection "
                   "under the interpreter (triton 3.6's needs numpy < 2.4)")
    c = commands.add_parser("check", help="every recorded launch hits the cache (CPU machine)")
    c.add_argument("--cache", default=str(DEFAULT))
    c.add_argument("--optional", action="store_true",
                   help="no cache, or one for another triton version, is a note, not a failure")
    commands.add_parser("selection", help="print the GPU command's test selection")
    i = commands.add_parser("install", help="copy the cache to DEST (GPU machine)")
    i.add_argument("dest")
    i.add_argument("--cache", default=str(DEFAULT))
    h = commands.add_parser("harvest", help="what triton compiled outside the carried cache, "
                            "as a tarball (GPU machine)")
    h.add_argument("cache_dir", help="the run's TRITON_CACHE_DIR")
    h.add_argument("tarball")
    h.add_argument("--carried", default=str(DEFAULT))
    m = commands.add_parser("merge", help="add a harvest to the carried cache (CPU machine)")
    m.add_argument("tarball")
    m.add_argument("--cache", default=str(DEFAULT))
    for sub in (b, c):
        sub.add_argument("--triton-path", help="a folder with triton at the cache's version")
        sub.add_argument("--jobs", type=int, default=os.cpu_count())
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    path = getattr(args, "triton_path", None) and str(Path(args.triton_path).resolve())
    if path and os.environ.get("VQFAST_CACHE_TRITON_PATH") != path:
        # again, with that triton first on the path from the start (for the workers too)
        env = dict(os.environ, VQFAST_CACHE_TRITON_PATH=path, PYTHONPATH=os.pathsep.join(
            p for p in (path, os.environ.get("PYTHONPATH")) if p))
        return subprocess.run([sys.executable, "-m", "benchmarks.gpu.cache", *argv], env=env,
                              cwd=REPO).returncode
    if args.command == "selection":
        print("\n".join(CORRECTNESS))
        return 0
    return {"build": build, "check": check, "install": install, "harvest": harvest,
            "merge": merge}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
