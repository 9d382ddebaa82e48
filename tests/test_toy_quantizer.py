"""One quantizer, one place: a new quantizer is its oracle, torch function, kernel and
launcher, op, module and spec, and nothing else. ``tests/toy_quantizer/`` holds a toy one
(``ChannelGridQuantizer``); this test drops its pieces into a copy of the package and runs,
in a subprocess, the fast registry tests, the shared tests of its spec and its oracle
comparison on both backends (Triton under the interpreter). Then it leaves out each piece
in turn: a fast test must fail, naming what is missing."""

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "toy_quantizer"

PIECES = {  # piece -> (its file in the copy, what the failing fast test names)
    "oracle": ("vqfast/reference/toy.py", "no vqfast.reference.channel_grid"),
    "torch function": ("vqfast/_torch/channel_grid.py", "vqfast._torch has no channel_grid_forward"),
    "kernel and launcher": ("vqfast/kernels/channel_grid.py",
                            "vqfast.kernels exports no channel_grid_forward"),
    "op": ("vqfast/ops/channel_grid.py", "cannot import name 'channel_grid' from 'vqfast.ops'"),
    "module": ("vqfast/channel_grid.py", "has no attribute 'ChannelGridQuantizer'"),
    "spec": ("tests/_specs.py", "no spec in tests/_specs.py for ['ChannelGridQuantizer']"),
}
FAST_TESTS = ["tests/test_registry.py::test_every_quantizer_has_a_spec_with_an_oracle",
              "tests/test_launch.py::test_every_dispatched_op_has_both_backends",
              "tests/test_launch.py::test_every_function_that_launches_is_a_guarded_launcher",
              "tests/test_launch.py::test_every_launched_kernel_is_compiled_ahead_of_time"]

# The module against its oracle, both backends (what the spec's oracle_tests points at).
ORACLE_CHECK = textwrap.dedent("""
    import torch
    import vqfast
    from vqfast import reference
    for backend in ("torch", "triton"):
        for dtype in (torch.float32, torch.bfloat16):
            module = vqfast.ChannelGridQuantizer(5, 3, backend=backend)
            z = (torch.randn(2, 3, 7, 3) * 1.3).to(dtype).requires_grad_()
            q, codes = module(z)
            rows = z.detach().movedim(1, -1).reshape(-1, 3).float()
            q_ref, codes_ref = reference.channel_grid(rows, module.levels)
            assert torch.equal(codes.flatten(), codes_ref), backend
            torch.testing.assert_close(q.detach().movedim(1, -1).reshape(-1, 3).float(),
                                       q_ref.to(dtype).float())
            q.sum().backward()
            assert torch.equal(z.grad, torch.ones_like(z))  # the identity's gradient
    print("oracle ok")
""")


def _copy(tmp: Path, leave_out: str | None) -> Path:
    """The package, its kernels and tests, with the toy's pieces (but ``leave_out``)."""
    ignore = shutil.ignore_patterns("__pycache__", "toy_quantizer")
    shutil.copytree(ROOT / "vqfast", tmp / "vqfast", ignore=ignore)
    shutil.copytree(ROOT / "kernels", tmp / "vqfast" / "kernels", ignore=ignore)
    shutil.copytree(ROOT / "tests", tmp / "tests", ignore=ignore)
    shutil.copytree(ROOT / "benchmarks", tmp / "benchmarks", ignore=ignore)
    for piece, (path, _) in PIECES.items():
        if piece == leave_out:
            continue
        if piece == "spec":
            with open(tmp / path, "a") as specs:
                marker = "# --- appended to tests/_specs.py ---"
                specs.write("\n" + (TOY / "spec.py").read_text().split(marker)[1])
        else:
            shutil.copy(TOY / path, tmp / path)
    return tmp


def _run(tmp: Path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tmp), TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, *args], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=900)


def test_the_toy_pieces_mirror_the_package():
    """Each toy piece sits where the package keeps that piece of every family."""
    for path, _ in PIECES.values():
        if path.startswith("vqfast/"):
            home = ROOT / ("kernels" if "/kernels/" in path else Path(path).parent.as_posix())
            assert home.is_dir(), path
    assert (TOY / "spec.py").read_text().count("SPECS.append") == 1
    assert "# --- appended to tests/_specs.py ---" in (TOY / "spec.py").read_text()


@pytest.mark.slow
def test_a_new_quantizer_needs_only_its_pieces(tmp_path):
    tmp = _copy(tmp_path, None)
    result = _run(tmp, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FAST_TESTS,
                  "tests/test_registry.py", "-k", "every or ChannelGrid")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # the fast tests and the spec's shared tests (2 backends): 10 in all
    assert re.search(r"\b(\d+) passed", result.stdout) and \
        int(re.search(r"\b(\d+) passed", result.stdout)[1]) >= 10, result.stdout[-2000:]
    result = _run(tmp, "-c", ORACLE_CHECK)
    assert result.returncode == 0 and "oracle ok" in result.stdout, result.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("piece", list(PIECES))
def test_a_missing_piece_fails_a_fast_test_naming_it(tmp_path, piece):
    tmp = _copy(tmp_path, piece)
    result = _run(tmp, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FAST_TESTS)
    assert result.returncode != 0, f"nothing failed without the {piece}"
    assert PIECES[piece][1] in result.stdout + result.stderr, (
        piece, (result.stdout + result.stderr)[-3000:])
