"""What triton's JIT would compile for a launch: its binder's specialisation of the
arguments (dtypes, divisibility by 16, ints equal to 1), the constexprs and the launch
options, as ``ASTSource`` inputs. Shared by ``benchmarks.host.StubbedLaunches`` (compiled
launches stubbed) and, as a pytest plugin, by the recording of a test run under the Triton
interpreter, whose launches triton would specialise alike on a GPU:

    VQFAST_RECORD_SPECIALIZATIONS=specs.pkl TRITON_INTERPRET=1 \\
        python -m pytest -p benchmarks.gpu.specializations tests/test_kernels.py

(``benchmarks.gpu.cache build`` runs the GPU command's test selection this way.) A launch
is recorded as a GPU's launcher would make it: ``UPCAST_DOT``, which the launchers set only
under the interpreter, is recorded off. vqfast's kernels are recorded, and the tests' own.
"""

import contextlib
import os
import pickle


def jit_kwargs(fn, kwargs: dict) -> dict:
    """``kwargs`` with what ``JITFunction.run`` adds before binding (debug, knobs)."""
    from triton import knobs
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    return kwargs


def describe(fn, backend, kwargs, bound_args, specialization, options) -> dict:
    """A bound launch of JIT function ``fn`` as ``benchmarks.host.recorded_source`` rebuilds
    it: module, kernel, signature, constexprs, attributes, launch options."""
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args,
                                                    specialization, options)
    option_names = set(backend.parse_options({}).__dict__)
    return {
        "module": fn.fn.__module__, "kernel": fn.fn.__name__, "signature": signature,
        "constexprs": constexprs, "attrs": attrs,
        "options": {k: v for k, v in kwargs.items() if k in option_names},
        # the constexprs by name (``constexprs`` keys them by argument index)
        "constants": {fn.arg_names[index[0]]: value for index, value in constexprs.items()}}


def sm90():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    return make_backend(GPUTarget("cuda", 90, 32))


def _recorded_module(name: str) -> bool:
    """vqfast's kernels and the tests' own (a test module: ``test_*``, imported from
    ``tests/``, as pytest imports it)."""
    return name.startswith("vqfast.kernels") or name.startswith("test_")


def import_kernel_module(name: str):
    """The module of a recorded kernel, a test module imported from ``tests/``."""
    import importlib
    import sys
    from pathlib import Path
    if name.startswith("test_"):
        tests = str(Path(__file__).resolve().parents[2] / "tests")
        if tests not in sys.path:
            sys.path.insert(0, tests)
    return importlib.import_module(name)


class InterpretedRecorder:
    """Under the Triton interpreter: each launch of a vqfast kernel bound, beside the
    interpreted run, by a JIT twin of the kernel, as a GPU's triton would bind it.
    ``recorded``: ``(kernel, specialisation, options) -> describe(...)`` with ``cases``,
    the tests that launched it."""

    def __init__(self):
        self.recorded, self.case, self._twins = {}, "", {}

    @contextlib.contextmanager
    def recording(self):
        from triton.runtime import jit
        from triton.runtime.interpreter import InterpretedFunction
        backend, run = sm90(), InterpretedFunction.run
        recorder = self

        def recording_run(interpreted, *args, grid, warmup, **kwargs):
            if _recorded_module(interpreted.fn.__module__):
                recorder._bind(jit, backend, interpreted.fn, args, kwargs)
            return run(interpreted, *args, grid=grid, warmup=warmup, **kwargs)
        InterpretedFunction.run = recording_run
        try:
            yield self
        finally:
            InterpretedFunction.run = run

    def _bind(self, jit, backend, function, args, kwargs) -> None:
        twin = self._twins.get(function)
        if twin is None:
            fn = jit.JITFunction(function)
            twin = self._twins[function] = (
                fn, jit.create_function_from_signature(fn.signature, fn.params, backend))
        fn, binder = twin
        kwargs = jit_kwargs(fn, kwargs)
        if kwargs.get("UPCAST_DOT"):  # the interpreter's 16-bit dots, upcast; never on a GPU
            kwargs["UPCAST_DOT"] = False
        bound_args, specialization, options = binder(*args, **kwargs)
        key = (function.__name__, repr(specialization), repr(options))
        if key not in self.recorded:
            self.recorded[key] = dict(describe(fn, backend, kwargs, bound_args,
                                               specialization, options), cases=[])
        cases = self.recorded[key]["cases"]
        if len(cases) < 3 and self.case not in cases:
            cases.append(self.case)


# --- the pytest plugin (active with VQFAST_RECORD_SPECIALIZATIONS set) -------------------
_RECORDER = InterpretedRecorder() if os.environ.get("VQFAST_RECORD_SPECIALIZATIONS") else None


def pytest_sessionstart(session):
    if _RECORDER is not None:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("VQFAST_RECORD_SPECIALIZATIONS records interpreted launches: "
                               "set TRITON_INTERPRET=1")
        session.config._vqfast_recording = _RECORDER.recording()
        session.config._vqfast_recording.__enter__()


def pytest_runtest_setup(item):
    if _RECORDER is not None:
        _RECORDER.case = item.nodeid


def pytest_sessionfinish(session):
    if _RECORDER is not None:
        session.config._vqfast_recording.__exit__(None, None, None)
        with open(os.environ["VQFAST_RECORD_SPECIALIZATIONS"], "wb") as f:
            pickle.dump(list(_RECORDER.recorded.values()), f)
