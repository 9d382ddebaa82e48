"""Launcher-side helpers: validation (the launcher checks once, the kernel trusts), the
launch configuration of the streaming kernels, and the device guard every launcher runs
under (``@launcher``)."""

import contextlib
import functools
import itertools
import os
import threading

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# For the ahead-of-time compile test: triton's pointer types per input dtype.
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


# The memory semantics of the atomics that only accumulate statistics (counts, code sums,
# codebook gradients): nothing reads them before the kernel ends (or before a ticket's
# acquire), so they need no ordering, and "relaxed" compiles to a bare reduction where the
# default "acq_rel" fences every element. A switch only for the benchmark's A/B.
STATS_SEM = "relaxed"

_guard = threading.local()


@contextlib.contextmanager
def device_guard(device: torch.device):
    """Launch on ``device``: triton launches on the *current* CUDA device, which need not be
    the tensors' (a module on ``cuda:1`` while ``cuda:0`` is current)."""
    _guard.depth = getattr(_guard, "depth", 0) + 1
    try:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            yield
    finally:
        _guard.depth -= 1


def in_device_guard() -> bool:
    """Whether a launch now runs under ``device_guard`` (the tests assert it of every launch)."""
    return getattr(_guard, "depth", 0) > 0


# Every launcher by name (``@launcher`` registers it): ``vqfast.kernels`` exports these, and
# an op dispatches to the one named as its torch-backend function is.
LAUNCHERS: dict = {}


def _other_cuda_device(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA device other than the current one (entering it costs
    microseconds at every launch: only then does a launcher switch)."""
    return (device.type == "cuda" and device.index is not None
            and device.index != torch.cuda.current_device())


def launcher(fn):
    """Decorate a kernel launcher: it runs on its first tensor argument's device (as under
    ``device_guard``, entering it only when it is another CUDA device than the current
    one), and is registered in ``LAUNCHERS`` under its name (exported by
    ``vqfast.kernels``; two launchers may not share a name).

    Cheap on the host (it runs at every launch): a launcher called from another runs in
    its guard as it is."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if getattr(_guard, "depth", 0):  # called by a launcher: already guarded
            return fn(*args, **kwargs)
        first = args[0] if args and isinstance(args[0], torch.Tensor) else next(
            (a for a in itertools.chain(args, kwargs.values()) if isinstance(a, torch.Tensor)),
            None)
        if first is None:
            raise TypeError(f"{fn.__name__} takes tensors, got none")
        switch = _other_cuda_device(first.device)
        _guard.depth = 1
        try:
            if switch:
                with torch.cuda.device(first.device):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)  # (already current, or CPU: the Triton interpreter)
        finally:
            _guard.depth = 0
    wrapper.is_launcher = True
    other = LAUNCHERS.get(fn.__name__)
    if other is not None and other.__module__ != fn.__module__:
        raise RuntimeError(f"two launchers named {fn.__name__}: {other.__module__} and "
                           f"{fn.__module__}")
    LAUNCHERS[fn.__name__] = wrapper
    return wrapper


def interpreted(device: torch.device) -> bool:
    """Whether a launch on ``device`` runs under the Triton interpreter (CPU tensors): the
    launchers upcast bf16 dot operands there (the interpreter multiplies them as raw bits).
    A recorder of the GPU's specialisations replaces it."""
    return device.type != "cuda"


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for grids (``triton.cdiv`` costs microseconds per call from Python)."""
    return -(-a // b)


def check_matrix(name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)})")


def check_same_device(**tensors: torch.Tensor) -> None:
    first = None
    for t in tensors.values():  # (every launch runs this: no dict or set on the way)
        if first is None:
            first = t.device
        elif t.device != first:
            devices = {name: t.device for name, t in tensors.items()}
            raise ValueError(f"tensors must share one device, got {devices}")


def check_codebook(codebook: torch.Tensor, dim: int) -> None:
    """A contiguous float ``[K, D]`` codebook whose D matches the inputs' ``dim``."""
    check_matrix("codebook", codebook)
    if codebook.shape[1] != dim:
        raise ValueError(f"x has D={dim} but codebook has D={codebook.shape[1]}")


def check_rows(name: str, t: torch.Tensor, rows: int, dtype: torch.dtype) -> None:
    if t.shape != (rows,) or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} [{rows}], got {t.dtype} {tuple(t.shape)}")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def launch_config(config: dict, dim: int) -> dict:
    """A streaming kernel's launch parameters for embedding dim ``dim``: ``config`` with its
    ``MAX_BLOCK_D`` replaced by ``BLOCK_D``, ``dim`` rounded up to a power of two in
    ``[16, MAX_BLOCK_D]`` (wider dims loop over channel blocks)."""
    config = dict(config)
    config["BLOCK_D"] = min(max(16, next_power_of_2(dim)), config.pop("MAX_BLOCK_D"))
    return config


LAUNCH_OPTIONS = ("num_warps", "num_stages")


def split_options(config: dict):
    """A launch config as the AOT test's ``(constexprs, compile options)``."""
    consts = {k: v for k, v in config.items() if k not in LAUNCH_OPTIONS}
    return consts, {k: config[k] for k in LAUNCH_OPTIONS if k in config}


def streaming_configs(config: dict):
    """Every ``(constexprs, options)`` that ``launch_config(config, dim)`` can give, over
    all dims: the configurations the AOT test compiles."""
    seen = {}
    for dim in (1, 17, 33, 65, 129, 4096):
        consts = launch_config(config, dim)
        seen[consts["BLOCK_D"]] = consts
    return [split_options(consts) for consts in seen.values()]


# --- launching --------------------------------------------------------------------------
# triton's cache hit (``JITFunction.run``) binds and specialises every argument, builds a
# cache key from them and the options and checks the kernel's globals, at every launch:
# several microseconds of host time each, which at small shapes is what a step costs.
# ``launch`` keys its own cache by what triton specialises on (each tensor's dtype and
# 16-byte alignment; each integer's value 1, divisibility by 16 and width; the constexprs
# and launch options), takes triton's own path for the first launch of each key (which
# compiles, or finds the compiled kernel) and then calls that compiled kernel's launcher
# directly, as ``CompiledKernel[grid]`` does.

FAST_LAUNCH = True  # off: every launch through triton's own path (the benchmark's A/B)
# On: each fast launch also asks triton which kernel it would run, and fails if another
# (``VQFAST_CHECK_LAUNCH_KEYS=1``: the GPU command's correctness part runs with it).
CHECK_LAUNCH_KEYS = os.environ.get("VQFAST_CHECK_LAUNCH_KEYS") == "1"

_INT32 = (-2**31, 2**31)


class _Recording(threading.local):
    """The launches of a call being recorded for a plan (``vqfast.kernels._plan``):
    ``(kernel, grid, args, fast-launch key or None)`` each, or ``None`` when none is."""
    launches = None


recording = _Recording()
LAUNCHED_KERNELS: list = []  # the kernels with a fast-launch cache (``_vqfast_launches``)
PLAN_CACHES: list = []  # the ops' launch plans (``vqfast.kernels._plan``), which replay them


def forget_fast_launches() -> None:
    """Drop every fast launch and every plan that replays them (the next launch of each key
    takes triton's own path again)."""
    for kernel in LAUNCHED_KERNELS:
        kernel.__dict__.pop("_vqfast_launches", None)
    LAUNCHED_KERNELS.clear()
    for plans in PLAN_CACHES:
        plans.clear()


def _arg_key(args) -> tuple:
    """What triton's binder specialises on, of the positional runtime arguments."""
    key = []
    for a in args:
        t = type(a)
        if t is torch.Tensor or t is torch.nn.Parameter:
            key.append(a.dtype)
            key.append(not a.data_ptr() & 15)
        elif t is int:  # 1 is a constant; divisibility by 16; i32, i64 or u64
            if _INT32[0] <= a < _INT32[1]:  # (tags, not 1 and True: those are equal keys)
                key.append("one" if a == 1 else "i32/16" if not a & 15 else "i32")
            else:
                key.append(("u64" if a >= 2**63 else "i64", not a & 15))
        elif t is bool or t is float or a is None:
            key.append(t)
        else:
            return None  # anything else: triton's own path
    return tuple(key)


class _FastEntry:
    __slots__ = ("compiled", "tail")

    def __init__(self, compiled, tail):
        self.compiled, self.tail = compiled, tail


def _entry(kernel, compiled, num_args: int, kwargs: dict):
    """The cached launch of ``compiled``, or ``None`` where the call cannot take the fast
    path (a runtime argument by keyword, or a parameter with neither a value nor a default)."""
    import inspect
    if hasattr(compiled, "result"):  # compiling asynchronously (a future): triton's path
        return None
    params = kernel.params
    tail = []
    for i, p in enumerate(params):
        given = p.name in kwargs
        if i < num_args:
            if given:
                return None
        elif given:
            if not p.is_constexpr:
                return None
            tail.append(kwargs[p.name])
        elif p.default is not inspect.Parameter.empty:
            tail.append(p.default)
        else:
            return None
    compiled._init_handles()
    return _FastEntry(compiled, tuple(tail))


def _current_device():
    return torch.cuda.current_device()


def _current_stream(device):
    return _triton().driver.active.get_current_stream(device)


@functools.cache
def _triton():
    """triton's driver and knobs, imported once (not at this module's import: the torch
    backend imports vqfast.kernels' helpers without needing triton initialised)."""
    import types

    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
    return types.SimpleNamespace(knobs=knobs, driver=driver, JITFunction=JITFunction)


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` at a fraction of its host cost: runtime arguments
    by position, constexprs and launch options (``num_warps``...) by keyword. Under the
    Triton interpreter, and for anything unusual, it is exactly triton's own call."""
    cache = kernel.__dict__.get("_vqfast_launches")
    if cache is None:
        if not FAST_LAUNCH or not isinstance(kernel, _triton().JITFunction):
            if recording.launches is not None:  # (a launch no plan can replay)
                recording.launches.append((kernel, grid, args, None))
            kernel[grid](*args, **kwargs)
            return
        cache = kernel.__dict__["_vqfast_launches"] = {}
        LAUNCHED_KERNELS.append(kernel)
    arg_key = _arg_key(args)
    device = _current_device()
    key, entry = None, False
    if arg_key is not None and FAST_LAUNCH:
        try:
            key = (device, arg_key, tuple(kwargs.items()), _triton().knobs.runtime.debug)
            entry = cache.get(key)
        except TypeError:  # an unhashable constexpr: triton's own path
            key = None
    if entry and getattr(kernel, "pre_run_hooks", None):  # hooks see triton's own launch
        entry = False
    if recording.launches is not None:
        recording.launches.append((kernel, grid, args, key))
    if not entry:  # None: first launch of this key; False: never fast
        compiled = kernel[grid](*args, **kwargs)
        if entry is None and key is not None and compiled is not None:
            cache[key] = _entry(kernel, compiled, len(args), kwargs) or False
        return
    compiled = entry.compiled
    if CHECK_LAUNCH_KEYS:
        expected = kernel.run(*args, grid=grid, warmup=True, **kwargs)
        if expected is not compiled:
            raise AssertionError(f"launch of {kernel.__name__}: the fast path's key {key} "
                                 "picked another specialisation than triton's")
    knobs = _triton().knobs
    stream = _current_stream(device)
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    full = (*args, *entry.tail)
    metadata = None if enter is None else compiled.launch_metadata(grid, stream, *full)
    n = len(grid)
    compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream,
                 compiled.function, compiled.packed_metadata, metadata, enter, leave, *full)
