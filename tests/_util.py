"""Shared test helpers: tolerances per dtype (one place) and tie-robust nearest-code checks."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Tests run on the GPU when there is one (Triton compiled), else on CPU (Triton interpreted).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu"

# Comparison of outputs against the oracle, per input dtype.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}

# Relative slack of a chosen code's distance over the true minimum: rounding of the
# expanded distance |x|^2 + |e|^2 - 2 x.e with operands in the input's dtype.
TIE_EPS = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def exact_sqdist(x, codebook):
    """``[N, K]`` squared distances in float64: for tests only."""
    return torch.cdist(x.double(), codebook.double()).pow(2)


def assert_nearest(x, codebook, idx, dtype=torch.float32):
    """Every chosen code is a nearest one, up to rounding ties scaled by the vectors' norms."""
    assert idx.dtype == torch.int64 and idx.shape == (x.shape[0],)
    assert int(idx.min()) >= 0 and int(idx.max()) < codebook.shape[0]
    d = exact_sqdist(x, codebook)
    chosen = d.gather(1, idx.view(-1, 1)).squeeze(1)
    scale = x.double().pow(2).sum(1) + codebook.double().pow(2).sum(1).max()
    slack = TIE_EPS[dtype] * scale + 1e-9
    excess = chosen - d.min(1).values
    assert bool((excess <= slack).all()), f"worst excess {excess.max().item()} over slack"


def same_codes_or_ties(x, codebook, idx_a, idx_b, dtype=torch.float32):
    """Rows where the two index choices differ must be ties (both nearest within slack)."""
    diff = idx_a != idx_b
    if bool(diff.any()):
        assert_nearest(x[diff], codebook, idx_a[diff], dtype)
        assert_nearest(x[diff], codebook, idx_b[diff], dtype)
    return diff




def _interpreter_broken():
    """Why the Triton interpreter cannot run here, or ``None``. Triton 3.6's interpreter
    fails under numpy >= 2.4 ("only 0-dimensional arrays can be converted to Python
    scalars"): the lent GPU's image has that pair, so probe instead of trusting versions."""
    if not INTERPRETED:
        return None
    try:
        from vqfast import kernels
        kernels.nearest_code(torch.zeros(1, 2), torch.zeros(1, 2))
    except ImportError as error:
        return f"triton is not importable: {error}"
    except Exception as error:  # triton wraps it in InterpreterError
        if "only 0-dimensional arrays can be converted" not in str(error):
            return None  # a real failure: let the tests show it
        import numpy
        import triton
        return (f"the Triton interpreter fails here (triton {triton.__version__}, numpy "
                f"{numpy.__version__}): {error}")
    return None


INTERPRETER_BROKEN = _interpreter_broken()


def _backends():
    """The backends testable here: torch always; triton on CUDA or under a working interpreter."""
    return ["torch"] if INTERPRETER_BROKEN else ["torch", "triton"]


BACKENDS = _backends()
# Big shapes (the seed's N=16384) take minutes in the interpreter: compiled backends only.
BACKENDS_BIG = [b for b in BACKENDS if not (b == "triton" and INTERPRETED)]


def tensor_state(module) -> dict:
    """``module.state_dict()`` without its non-tensor entries (the recorded options)."""
    return {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}

# The original algorithm's arguments (no k-means init, no dead-code re-seeding): what the
# oracle tests build the modules with.
import vqfast as _vqfast  # noqa: E402

ORIGINAL = dict(_vqfast.ORIGINAL_ALGORITHM)


def run_uninterpreted(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python -c script *args`` from the repository root with the Triton interpreter off
    (scripts that stub compiled launches: ``benchmarks.host.StubbedLaunches``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
