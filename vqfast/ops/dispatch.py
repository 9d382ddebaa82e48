"""Backend dispatch and the input checks every quantizer family shares: which backend
runs an op (Triton kernels on CUDA, the torch path elsewhere), dtype and layout checks of
the modules' inputs."""

import functools
import inspect
import os

import torch

from .. import _torch

BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PRECISIONS = ("ieee", "tf32", "tf32x3")


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend(backend: str) -> None:
    """A constructor's check of its ``backend`` option (resolved per call by ``resolve_backend``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _auto_backend(device: torch.device) -> str:
    """What ``auto`` means for tensors on ``device``."""
    return "triton" if device.type == "cuda" else "torch"


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` for CUDA tensors, ``torch`` otherwise; checks ``triton`` is usable."""
    check_backend(backend)
    if backend == "auto":
        return _auto_backend(device)
    if backend == "triton" and device.type != "cuda" and not _triton_interpreted():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device.type}); on CPU it runs only under "
            "the Triton interpreter (set TRITON_INTERPRET=1 before importing vqfast)")
    return backend


class CustomOp:
    """A vqfast op: registered with ``torch.library`` (``torch.ops.vqfast.<name>``, what
    ``torch.compile``, ``torch.export`` and ``opcheck`` see, with its fake), and called
    directly in eager mode. The custom op's dispatch (filling defaults, the autograd
    wrapper, the dispatcher) costs more host time than a kernel launch, and in eager it
    decides nothing: the ops carry no autograd of their own (the ``autograd.Function``s
    around them do) and their implementations dispatch on the backend themselves."""

    def __init__(self, name: str, fn, mutates_args):
        self.fn = fn
        self.op = torch.library.custom_op(f"vqfast::{name}", mutates_args=mutates_args)(fn)
        params = list(inspect.signature(fn).parameters)
        self._backend_at = params.index("backend") if "backend" in params else None
        self._plans = None  # on the Triton backend: ``vqfast.kernels._plan``'s, by call key

    def register_fake(self, fake):
        return self.op.register_fake(fake)

    def __call__(self, *args):
        # traced, or fake / functional tensors (the first argument is one: every op's first
        # argument is a tensor): the registered op
        if torch.compiler.is_compiling() or type(args[0]) not in _PLAIN:
            return self.op(*args)
        at = self._backend_at
        run = (self._planned if at is not None and len(args) > at and args[at] == "triton"
               else self.fn)
        if torch.is_grad_enabled():  # as the op: its outputs never carry a graph
            torch._C._set_grad_enabled(False)
            try:
                return run(*args)
            finally:
                torch._C._set_grad_enabled(True)
        return run(*args)

    def _planned(self, *args):
        """The Triton backend's call through a launch plan (``vqfast.kernels._plan``): a
        call key's second call records the op, later ones replay it."""
        plans = self._plans
        if plans is None:
            plans = self._plans = _plan().new_plan_cache()
        return _plan().call(plans, self.fn, args)


@functools.cache
def _plan():
    """``vqfast.kernels._plan``, imported on the first Triton call (not with this module:
    the torch backend needs no Triton)."""
    from ..kernels import _plan as plan_module
    return plan_module


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def custom_op(name: str, mutates_args=()):
    """``@custom_op("name")`` on an op's implementation: a ``CustomOp``."""
    return lambda fn: CustomOp(name, fn, mutates_args)


def _impl(backend: str):
    if backend == "triton":
        from .. import kernels
        return kernels
    return _torch


def _check_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be fp32, fp16 or bf16 (the kernels' dtypes, on every "
                        f"backend), got {x.dtype}; cast it, e.g. x.float()")


def check_codebook_input(x: torch.Tensor, codebook: torch.Tensor, name: str = "x") -> None:
    """Validate a flat ``[N, D]`` input against a ``[K, D]`` codebook; raise before any work."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    _check_dtype(name, x)
    if x.shape[-1] != codebook.shape[1]:
        raise ValueError(f"{name} has {x.shape[-1]} channels but the codebook has embedding_dim="
                         f"{codebook.shape[1]}")
    if x.device != codebook.device:
        raise ValueError(f"{name} is on {x.device} but the codebook is on {codebook.device}; "
                         "move the module with .to(device)")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); need at least one vector")


def channels_first(name: str, inputs, channels: int) -> torch.Tensor:
    """Validate a quantizer's input ``[B, C, *spatial]`` (a tensor, at least one spatial dim,
    ``channels`` channels, fp32/fp16/bf16, not empty); return it as contiguous ``[B, C, S]``
    (a view when it already is: the kernels read channels-first in place)."""
    if not isinstance(inputs, torch.Tensor):
        hint = (" (torch.from_numpy(array) makes one without a copy)"
                if type(inputs).__module__.split(".")[0] == "numpy" else "")
        raise TypeError(f"{name} must be a torch.Tensor, got {type(inputs).__name__}{hint}")
    if inputs.dim() < 3:
        hint = (f"; for [N, {channels}] rows use inputs.T.unsqueeze(0) ([1, {channels}, N]) or "
                f"vqfast.nearest_code" if inputs.dim() == 2 and inputs.shape[-1] == channels else "")
        raise ValueError(f"{name} must be channels-first [B, C, *spatial] with at least one "
                         f"spatial dim, got shape {tuple(inputs.shape)}{hint}")
    if inputs.shape[1] != channels:
        hint = ("; it looks channels-last ([B, *spatial, C]): build the quantizer with "
                "channel_last=True (read in place) or pass inputs.movedim(-1, 1)"
                if inputs.shape[-1] == channels else "")
        raise ValueError(f"{name} has {inputs.shape[1]} channels (dim 1), expected {channels}; "
                         f"shape {tuple(inputs.shape)}{hint}")
    _check_dtype(name, inputs)
    if inputs.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(inputs.shape)}); need at least one vector")
    return inputs.reshape(inputs.shape[0], channels, -1).contiguous()


def channels_last(name: str, inputs, channels: int) -> torch.Tensor:
    """Validate a ``channel_last=True`` quantizer's input ``[B, *spatial, C]`` (``[B, N, C]``
    tokens, or ``[N, C]`` rows); return it as contiguous ``[N, C, 1]``: rows, which is the
    channels-first layout with ``S = 1`` (a view when it already is: the kernels and the
    torch path read it in place, no transpose)."""
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.dim() < 2:
        raise ValueError(f"{name} must be channels-last [B, *spatial, C] (channel_last=True), "
                         f"got shape {tuple(inputs.shape)}")
    if inputs.shape[-1] != channels:
        hint = ("; it looks channels-first ([B, C, *spatial]): build the quantizer with "
                "channel_last=False or pass inputs.movedim(1, -1)"
                if inputs.dim() > 2 and inputs.shape[1] == channels else "")
        raise ValueError(f"{name} has {inputs.shape[-1]} channels (last dim), expected "
                         f"{channels}; shape {tuple(inputs.shape)}{hint}")
    _check_dtype(name, inputs)
    if inputs.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(inputs.shape)}); need at least one vector")
    return inputs.reshape(-1, channels, 1).contiguous()
