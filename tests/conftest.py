import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors under the interpreter. Its flag is
# read when @triton.jit decorates: set it before vqfast.kernels is imported. The AOT tests
# compile in a subprocess with the flag off.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "own_chaos: the test sets chaos mode itself (--chaos does not apply)")
    config.addinivalue_line("markers", "kernels: a file of kernel tests, which CI also runs in chaos "
                            "mode and under triton 3.8's interpreter (a new family's tests opt in here)")
    config.addinivalue_line("markers", "chaos: a file CI also runs in chaos mode (not under 3.8)")


def pytest_addoption(parser):
    parser.addoption("--chaos", choices=("off", "reversed", "random"),
                     default=os.environ.get("VQFAST_CHAOS", "off"),
                     help="run every interpreted launch's programs in this order and poison "
                          "new torch.empty tensors (tests/_chaos.py); default $VQFAST_CHAOS or off")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _chaos(request):
    order = request.config.getoption("--chaos")
    if (order == "off" or os.environ.get("TRITON_INTERPRET") != "1"
            or request.node.get_closest_marker("own_chaos")):
        yield
        return
    from _chaos import chaos
    with chaos(order):
        yield


@pytest.fixture(autouse=True)
def _launches_under_device_guard(monkeypatch):
    """Every interpreted launch must come from a launcher inside its device guard
    (``vqfast.kernels._launch.launcher``): triton launches on the current CUDA device."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    try:
        from triton.runtime.interpreter import GridExecutor
        from vqfast.kernels._launch import in_device_guard
    except ImportError:
        yield
        return
    call = GridExecutor.__call__

    def guarded(self, *args, **kwargs):
        if not getattr(self.fn, "__module__", "").startswith("vqfast.kernels"):
            return call(self, *args, **kwargs)  # the tests' own kernels
        assert in_device_guard(), f"{self.fn.__name__} launched outside its launcher's device guard"
        return call(self, *args, **kwargs)
    monkeypatch.setattr(GridExecutor, "__call__", guarded)
    yield


# On a GPU: what triton compiled during the run, and what it found in its cache (the
# Triton cache carried to the machine: benchmarks.gpu.cache), in the terminal summary.
_TRITON_BUILDS = {"compiled": [], "cached": 0}


def pytest_sessionstart(session):
    if not torch.cuda.is_available():
        return
    try:
        from benchmarks.gpu import compile_log
    except ImportError:  # (pytest run without the repository on the path)
        return

    def on_build(kernel, cache_hit):
        if cache_hit:
            _TRITON_BUILDS["cached"] += 1
        else:
            _TRITON_BUILDS["compiled"].append(kernel)
    compile_log.install(on_build)


def pytest_terminal_summary(terminalreporter):
    compiled = _TRITON_BUILDS["compiled"]
    if compiled or _TRITON_BUILDS["cached"]:
        names = ", ".join(sorted(set(compiled))[:12])
        terminalreporter.write_line(
            f"triton: {len(compiled)} kernel builds compiled here{f' ({names})' if names else ''}"
            f", {_TRITON_BUILDS['cached']} found in triton's cache")
