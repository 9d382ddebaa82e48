"""Chaos mode for the Triton interpreter: what a GPU does that the interpreter does not.

A GPU runs a launch's programs concurrently, in no set order, on memory that
``torch.empty`` left dirty. The interpreter runs them one after the other in grid order on
memory that is often zero. Under ``chaos(order)`` every interpreted launch runs its programs
in another order (``"reversed"``, or ``"random"``: a seeded permutation per launch) and
every new ``torch.empty`` / ``empty_like`` / ``new_empty`` tensor is filled with garbage
(NaN for floats, a large odd pattern for integers, True for bools), so a kernel that relies
on program order (``pid == num_programs - 1`` as "the last program") or reads memory it did
not write gives wrong results.

Opt in for a whole run with ``pytest --chaos=random`` (or ``reversed``), or the environment
variable ``VQFAST_CHAOS``; ``tests/test_chaos.py`` proves the patches take effect. Deselect
the ``torch.compile`` tests there (``-k "not compile"``): dynamo cannot trace the patched
constructors.
"""

import contextlib
import itertools

import numpy as np
import torch

ORDERS = ("reversed", "random")
GARBAGE_INT = 0x5A5A5A5A


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.numel():
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        else:
            t.fill_(GARBAGE_INT if torch.iinfo(t.dtype).max >= GARBAGE_INT else -1)
    return t


def _poisoning(fn):
    def poisoned(*args, **kwargs):
        return _poison(fn(*args, **kwargs))
    poisoned.__wrapped__ = fn
    return poisoned


@contextlib.contextmanager
def chaos(order: str = "random", seed: int = 0):
    """Programs of every interpreted launch in ``order``; new empty tensors poisoned."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    from triton.runtime.interpreter import InterpreterBuilder

    launches = itertools.count()
    set_dim, set_idx = InterpreterBuilder.set_grid_dim, InterpreterBuilder.set_grid_idx

    def set_grid_dim(self, nx, ny, nz):
        set_dim(self, nx, ny, nz)
        total = nx * ny * nz
        if order == "reversed":
            self._chaos_order = np.arange(total)[::-1]
        else:
            self._chaos_order = np.random.default_rng(seed + next(launches)).permutation(total)

    def set_grid_idx(self, x, y, z):
        nx, ny, nz = self.grid_dim
        flat = int(self._chaos_order[(x * ny + y) * nz + z])
        set_idx(self, flat // (ny * nz), flat // nz % ny, flat % nz)

    patches = [(InterpreterBuilder, "set_grid_dim", set_grid_dim),
               (InterpreterBuilder, "set_grid_idx", set_grid_idx),
               (torch, "empty", _poisoning(torch.empty)),
               (torch, "empty_like", _poisoning(torch.empty_like)),
               (torch.Tensor, "new_empty", _poisoning(torch.Tensor.new_empty))]
    with patched(patches):
        yield


@contextlib.contextmanager
def patched(patches):
    """``setattr(owner, name, value)`` for each ``(owner, name, value)``, undone on exit."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
