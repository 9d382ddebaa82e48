"""torch.compile(fullgraph=True) traces the quantizers through the vqfast custom ops."""

import pytest
import torch

import vqfast
from _util import BACKENDS, DEVICE


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["plain", "ema"])
def test_compiled_matches_eager(kind, backend):
    torch._dynamo.reset()
    cls = vqfast.VectorQuantizerEMA if kind == "ema" else vqfast.VectorQuantizer
    eager = cls(23, 6, 0.25, backend=backend).to(DEVICE)
    compiled_module = cls(23, 6, 0.25, backend=backend).to(DEVICE)
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        z = torch.randn(2, 6, 5, 7, device=DEVICE)
        z_e, z_c = z.clone().requires_grad_(), z.clone().requires_grad_()
        loss_e, q_e, perp_e, enc_e = eager(z_e)
        loss_c, q_c, perp_c, enc_c = compiled(z_c)
        (loss_e + q_e.pow(2).sum()).backward()
        (loss_c + q_c.pow(2).sum()).backward()
        torch.testing.assert_close(q_c, q_e)
        torch.testing.assert_close(loss_c, loss_e)
        torch.testing.assert_close(perp_c, perp_e)
        assert torch.equal(enc_c, enc_e)
        torch.testing.assert_close(z_c.grad, z_e.grad)
        if kind == "plain":
            torch.testing.assert_close(compiled_module.codebook.grad, eager.codebook.grad)
    for key, value in eager.state_dict().items():  # buffer mutations survive compilation
        torch.testing.assert_close(compiled_module.state_dict()[key], value)
