import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors under the interpreter. Its flag is
# read when @triton.jit decorates: set it before vqfast.kernels is imported. The AOT tests
# compile in a subprocess with the flag off.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
