"""What a GPU launch needs that the interpreter forgives: the device guard and 64-bit offsets.

- Every launcher runs under ``vqfast.kernels._launch.device_guard`` (triton launches on the
  *current* CUDA device). ``conftest.py`` asserts it of every interpreted launch of the
  whole suite; here: every function that launches a kernel is a ``@launcher``, a raw launch
  fails, and the guard enters the tensors' CUDA device.
- Offsets past 2**31 elements: each kernel runs on a tensor whose far channels (or rows)
  lie past 2**31 elements. The tensors are reserved, not touched (the pages a kernel does
  not read stay unallocated), and only one program of the grid runs (``one_program``), so
  each case costs milliseconds; its results are compared with a small launch on the same
  rows. Launchers that refuse a shape instead are tested on both sides of their limit.
"""

import ast
import contextlib
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import vqfast  # noqa: E402
from vqfast import kernels  # noqa: E402
from vqfast.kernels import _launch  # noqa: E402
from _chaos import patched  # noqa: E402
from _util import DEVICE, INTERPRETED, INTERPRETER_BROKEN  # noqa: E402

# The huge tensors here are reserved, never touched: chaos mode would fill them.
pytestmark = [pytest.mark.kernels, pytest.mark.own_chaos]

interpreted_only = pytest.mark.skipif(not INTERPRETED or INTERPRETER_BROKEN is not None,
                                      reason="runs single programs under the Triton interpreter")


def _kernel_modules():
    return [importlib.import_module(f"vqfast.kernels.{m.name}")
            for m in pkgutil.iter_modules(kernels.__path__) if not m.name.startswith("_")]


def _raw_launch(n) -> str | None:
    """The kernel a node launches as ``kernel[grid](...)``, else ``None``."""
    if (isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)
            and isinstance(n.func.value, ast.Name) and n.func.value.id.endswith("_kernel")):
        return n.func.value.id
    return None


def _launch_of(n) -> str | None:
    """The kernel a node launches (``launch(kernel, grid, ...)`` or ``kernel[grid](...)``)."""
    if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "launch" and n.args:
        chosen = n.args[0]  # a kernel, or a choice of two (``a if ... else b``)
        names = [c.id for c in ((chosen.body, chosen.orelse) if isinstance(chosen, ast.IfExp)
                                else (chosen,)) if isinstance(c, ast.Name)]
        return " ".join(names) or None
    return _raw_launch(n)


def test_every_function_that_launches_is_a_guarded_launcher():
    """A new launcher cannot forget the guard: any function of ``vqfast.kernels`` whose body
    launches a ``@triton.jit`` kernel must be a ``@launcher``, and launch through
    ``_launch.launch`` (the fast path), not ``kernel[grid](...)``."""
    launching = []
    for module in _kernel_modules():
        tree = ast.parse(inspect.getsource(module))
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef):
                continue
            raw = [_raw_launch(n) for n in ast.walk(node) if _raw_launch(n)]
            assert not raw, (f"{module.__name__}.{node.name} launches {raw} as kernel[grid](...): "
                             "use launch(kernel, grid, ...) (vqfast.kernels._launch)")
            if any(_launch_of(n) for n in ast.walk(node)):
                launching.append(f"{module.__name__}.{node.name}")
                assert getattr(getattr(module, node.name), "is_launcher", False), (
                    f"{module.__name__}.{node.name} launches a kernel but is not a @launcher")
    assert len(launching) >= 12, launching


def _launched_kernels(module):
    """The ``@triton.jit`` kernels ``module``'s functions launch."""
    tree = ast.parse(inspect.getsource(module))
    return {name for n in ast.walk(tree) for name in (_launch_of(n) or "").split()}


def test_every_launched_kernel_is_compiled_ahead_of_time():
    """The registry cannot lose a kernel: a module that launches a ``@triton.jit`` kernel
    lists its configurations in ``aot_variants()`` (and so is in ``KERNEL_MODULES``), and
    every kernel it launches appears there (the AOT test compiles exactly those)."""
    for module in _kernel_modules():
        launched = _launched_kernels(module)
        if not launched:
            continue
        name = module.__name__.rsplit(".", 1)[-1]
        assert hasattr(module, "aot_variants") and name in kernels.KERNEL_MODULES, (
            f"{module.__name__} launches {sorted(launched)} but has no aot_variants()")
        compiled = {variant[1] for variant in module.aot_variants()}
        for kernel in launched:
            assert getattr(module, kernel) in compiled, (
                f"{module.__name__}.{kernel} is launched but not in its aot_variants()")


@interpreted_only
def test_a_launch_outside_the_guard_fails():
    fsq = importlib.import_module("vqfast.kernels.fsq")
    module = vqfast.FSQ([3, 4])
    z = torch.randn(5, 2)
    with pytest.raises(AssertionError, match="outside its launcher's device guard"):
        fsq._fsq_forward_kernel[(1,)](z, module.params, module.basis, torch.empty_like(z),
                                      torch.empty(5, dtype=torch.int64), 5, 2, 1, BLOCK_N=8)
    kernels.fsq_forward(z, module.params, module.basis)  # through its launcher: fine


def test_device_guard_enters_the_tensors_cuda_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(torch.device(d))
        yield
    monkeypatch.setattr(torch.cuda, "device", device)
    with _launch.device_guard(torch.device("cuda", 1)):
        assert _launch.in_device_guard()
    with _launch.device_guard(torch.device("cpu")):
        assert _launch.in_device_guard()
    assert entered == [torch.device("cuda", 1)] and not _launch.in_device_guard()

    @_launch.launcher
    def fake_launcher(name, x, *, y):
        assert _launch.in_device_guard()
        return inner(y=x)

    @_launch.launcher
    def inner(*, y):  # called by a launcher: runs in its guard, no second one
        assert _launch.in_device_guard()
        return y.device
    monkeypatch.setattr(_launch, "device_guard", lambda d: (entered.append(d), contextlib.nullcontext())[1])
    assert fake_launcher("a", torch.zeros(1, device="meta"), y=1) == torch.device("meta")
    assert len(entered) == 1 and not _launch.in_device_guard()  # no CUDA device to enter


def test_launchers_switch_only_to_another_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert _launch._other_cuda_device(torch.device("cuda", 1))
    assert not _launch._other_cuda_device(torch.device("cuda", 0))
    assert not _launch._other_cuda_device(torch.device("cuda"))  # the current one
    assert not _launch._other_cuda_device(torch.device("cpu"))


# --- offsets past 2**31 -------------------------------------------------------------------

BIG = 2**31


@contextlib.contextmanager
def one_program(which):
    """Interpreted launches run only the ``"first"`` or ``"last"`` program of grid axis 0
    (``num_programs`` still reports the whole grid), and skip the interpreter's copy of the
    arguments back onto themselves (CPU tensors share their storage with it)."""
    from triton.runtime.interpreter import GridExecutor, InterpretedFunction, InterpreterBuilder
    run, set_dim, set_idx = InterpretedFunction.run, InterpreterBuilder.set_grid_dim, InterpreterBuilder.set_grid_idx
    restore = GridExecutor._restore_args_dev
    state = {}

    def clipped_run(self, *args, grid, warmup, **kwargs):
        def clipped(meta):
            full = grid(meta) if callable(grid) else grid
            state["programs"] = full[0]
            return (1,) + tuple(full[1:])
        return run(self, *args, grid=clipped, warmup=warmup, **kwargs)

    def set_grid_dim(self, nx, ny, nz):
        set_dim(self, state["programs"], ny, nz)

    def set_grid_idx(self, x, y, z):
        set_idx(self, 0 if which == "first" else state["programs"] - 1, y, z)

    def restore_args(self, args_dev, args_hst, kwargs, kwargs_hst):
        if any(getattr(a, "device", torch.device("cpu")).type != "cpu" for a in args_dev):
            restore(self, args_dev, args_hst, kwargs, kwargs_hst)
    patches = [(InterpretedFunction, "run", clipped_run), (InterpreterBuilder, "set_grid_dim", set_grid_dim),
               (InterpreterBuilder, "set_grid_idx", set_grid_idx), (GridExecutor, "_restore_args_dev", restore_args)]
    with patched(patches):
        yield


def _huge_channels_first(channels, spatial, rows, dtype=torch.float16):
    """``[1, channels, spatial]`` reserved, its first ``rows`` vectors set (random)."""
    x = torch.empty(1, channels, spatial, dtype=dtype)
    small = torch.randn(1, channels, rows).to(dtype)
    x[:, :, :rows] = small
    return x, small


# A channel offset (channels - 1) * S just past 2**31 with S < 2**31 rows.
S_BIG = BIG // 2 + 1


@interpreted_only
def test_fsq_channel_offsets_past_2_31():
    module = vqfast.FSQ([8, 5, 5])
    rows = 32
    z, small = _huge_channels_first(3, S_BIG, rows)
    grad_q, grad_small = _huge_channels_first(3, S_BIG, rows)
    with one_program("first"):
        q, codes = kernels.fsq_forward(z, module.params, module.basis)
        grad_z = kernels.fsq_backward(grad_q, z, module.params)
    q_small, codes_small = kernels.fsq_forward(small, module.params, module.basis)
    assert torch.equal(q[:, :, :rows], q_small) and torch.equal(codes[:rows], codes_small)
    assert torch.equal(grad_z[:, :, :rows], kernels.fsq_backward(grad_small, small, module.params))


class _RecordedLaunch:
    """Stands in for a kernel: records that the launcher got past its checks."""

    def __init__(self):
        self.launched = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launched += 1
        return launch


@pytest.mark.parametrize("channels,accepted", [(BIG // 2 - 1, True), (BIG // 2, False)])
@pytest.mark.parametrize("op", ["gather_loss", "quantize_backward", "code_sums_sorted"])
def test_one_batch_item_below_2_31_elements(op, channels, accepted, monkeypatch):
    """gather_loss, quantize_backward and code_sums index within a batch item with 32-bit
    offsets (64-bit ones spill registers there): ``D * S`` must stay below 2**31."""
    module = importlib.import_module(f"vqfast.kernels.{op if op != 'code_sums_sorted' else 'code_sums'}")
    fake = _RecordedLaunch()
    kernel = next(name for name in vars(module) if name.startswith("_") and name.endswith("_kernel"))
    monkeypatch.setattr(module, kernel, fake)
    x = torch.empty(1, channels, 2, dtype=torch.float16, device=DEVICE)  # D * S = channels * 2
    codebook = torch.empty(3, channels, device=DEVICE)
    idx = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    calls = {"gather_loss": lambda: module.gather_loss(x, codebook, idx, False),
             "quantize_backward": lambda: module.quantize_backward(
                 x, torch.ones((), device=DEVICE), x, codebook, idx, 1.0, 0.0),
             "code_sums_sorted": lambda: module.code_sums_sorted(x, idx, 3)}
    if accepted:
        calls[op]()
        assert fake.launched == 1
    else:
        with pytest.raises(ValueError, match="at most 2\\*\\*31 - 1"):
            calls[op]()


@interpreted_only
def test_lfq_row_offsets_past_2_31():
    d = 16
    n = BIG // d + 16  # the last row tile lies past 2**31 elements
    x = torch.empty(n, d, dtype=torch.float16)
    small = torch.randn(16, d).to(torch.float16)
    x[-16:] = small
    lse = torch.empty(n)
    lse[-16:] = torch.logsumexp(2.0 * small.float().abs(), dim=1)  # any finite values
    g = torch.randn(2**d)
    with one_program("last"):
        grad = kernels.lfq_entropy_backward(x, lse, g, 0.5, 1.0)
    expected = kernels.lfq_entropy_backward(small, lse[-16:].clone(), g, 0.5, 1.0)
    torch.testing.assert_close(grad[-16:], expected)


@interpreted_only
def test_residual_group_offsets_past_2_31():
    """Group 1 of 2 (4 channels each) starts at 4 * S > 2**31 elements into the batch item."""
    residual = importlib.import_module("vqfast.kernels.residual_vq")
    rows = residual.pick_config(torch.float16, "ieee", residual.FORWARD_CONFIGS)["BLOCK_N"]
    s = BIG // 4 + 1
    x, small = _huge_channels_first(8, s, rows)
    codebooks = torch.randn(2, 7, 4)
    with one_program("first"):
        q, idx, _, counts, code_sums = kernels.residual_quantize(
            x, codebooks, 1, 2, False, None, None, True)
    q_small, idx_small, _, counts_small, sums_small = kernels.residual_quantize(
        small, codebooks, 1, 2, False, None, None, True)
    assert torch.equal(q[:, :, :rows], q_small) and torch.equal(idx[:, :rows], idx_small)
    assert torch.equal(counts, counts_small)
    torch.testing.assert_close(code_sums, sums_small)


@pytest.mark.parametrize("rows,accepted", [(BIG - 1, True), (BIG, False)])
def test_nearest_code_refuses_rows_from_2_31(rows, accepted, monkeypatch):
    module = importlib.import_module("vqfast.kernels.nearest_code")
    fake = _RecordedLaunch()
    monkeypatch.setattr(module, "_nearest_code_kernel", fake)
    x = torch.empty(rows, 1, dtype=torch.float16, device=DEVICE)
    codebook = torch.randn(3, 1, device=DEVICE)
    if accepted:
        module.nearest_code(x, codebook)
        assert fake.launched == 1
    else:
        with pytest.raises(ValueError, match="too large for 32-bit"):
            module.nearest_code(x, codebook)


@pytest.mark.parametrize("rows,accepted", [(BIG // 2 - 1, True), (BIG // 2, False)])
def test_residual_refuses_rows_times_levels_from_2_31(rows, accepted, monkeypatch):
    module = importlib.import_module("vqfast.kernels.residual_vq")
    fake = _RecordedLaunch()
    monkeypatch.setattr(module, "_residual_forward_kernel", fake)
    x = torch.empty(rows, 1, dtype=torch.float16, device=DEVICE)
    codebooks = torch.randn(2, 3, 1, device=DEVICE)
    call = lambda: module.residual_quantize(x, codebooks, 2, 1, False, None, None, False)  # noqa: E731
    if accepted:
        call()
        assert fake.launched == 1
    else:
        with pytest.raises(ValueError, match="too large for 32-bit"):
            call()


@pytest.mark.parametrize("d,accepted", [(24, True), (25, False)])
def test_lfq_refuses_more_than_24_channels(d, accepted, monkeypatch):
    module = importlib.import_module("vqfast.kernels.lfq_entropy")
    fake = _RecordedLaunch()
    monkeypatch.setattr(module, "_lfq_avg_prob_kernel", fake)
    x, lse = torch.randn(3, d, device=DEVICE), torch.zeros(3, device=DEVICE)
    if accepted:
        module.lfq_avg_prob(x, lse, 1.0)
        assert fake.launched == 1
    else:
        with pytest.raises(ValueError, match="d <= 24"):
            module.lfq_avg_prob(x, lse, 1.0)


def test_every_dispatched_op_has_both_backends():
    """The ops reach an implementation by name (``_impl(backend).<name>``, or ``impl =
    _impl(backend)`` then ``impl.<name>(...)``): each name must exist, with the same
    parameters, in the torch backend and among the Triton launchers, or the Triton path
    would fail only when it first runs. A fast test naming the missing piece."""
    import inspect
    import re
    from pathlib import Path

    from vqfast import _torch
    ops_dir = Path(vqfast.__file__).parent / "ops"
    names = set()
    for path in ops_dir.glob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r"_impl\(\w+\)\.(\w+)", text))
        names |= set(re.findall(r"\bimpl\.(\w+)\(", text))
    assert {"nearest_code", "gather_loss", "ema_update", "reseed_codes"} <= names
    for name in sorted(names):
        assert hasattr(_torch, name), f"vqfast._torch has no {name} (the torch backend of the op)"
        assert hasattr(kernels, name), f"vqfast.kernels exports no {name} (the op's Triton launcher)"
        torch_params = list(inspect.signature(getattr(_torch, name)).parameters)
        kernel_params = list(inspect.signature(getattr(kernels, name)).parameters)
        assert torch_params == kernel_params, (name, torch_params, kernel_params)
