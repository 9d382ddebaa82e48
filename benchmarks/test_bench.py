"""pytest-benchmark cases for the suite's ops at the seed shape.

``python -m pytest benchmarks --benchmark-enable`` measures; the default test run calls
each case once as a smoke test (``--benchmark-disable`` in pyproject's addopts).
"""

import pytest
import torch

from benchmarks import suite

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = [i for i in suite.IMPLS if i != "vqfast[triton]" or DEVICE.type == "cuda"]


CASES = [(op, impl) for op in suite.OPS for impl in IMPLS
         if not (op == "nearest" and impl == "vector-quantize-pytorch")]  # it has no such op


@pytest.mark.parametrize("op,impl", CASES)
def test_seed_shape(benchmark, op, impl):
    try:
        fn = suite.make_case(impl, op, suite.SEED, DEVICE, torch.float32)
    except suite.Skip as reason:
        pytest.skip(str(reason))
    if DEVICE.type == "cuda":
        run = fn
        fn = lambda: (run(), torch.cuda.synchronize())  # noqa: E731
    benchmark(fn)
