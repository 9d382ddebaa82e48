import os

# The Triton interpreter is read when @triton.jit decorates: set it before vqfast.kernels
# is imported, so the kernels run on CPU tensors. The AOT tests compile in a subprocess
# with the flag off.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
