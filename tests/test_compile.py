"""torch.compile(fullgraph=True) traces the quantizers through the vqfast custom ops."""

import pytest
import torch

import vqfast
from _util import ORIGINAL, BACKENDS, DEVICE, tensor_state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["plain", "ema"])
def test_compiled_matches_eager(kind, backend):
    torch._dynamo.reset()
    cls = vqfast.VectorQuantizerEMA if kind == "ema" else vqfast.VectorQuantizer
    eager = cls(23, 6, 0.25, backend=backend, **ORIGINAL).to(DEVICE)
    compiled_module = cls(23, 6, 0.25, backend=backend, **ORIGINAL).to(DEVICE)
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
    for key, value in tensor_state(eager).items():  # buffer mutations survive compilation
        torch.testing.assert_close(compiled_module.state_dict()[key], value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["rows", "channels_first"])
def test_custom_ops_pass_opcheck(layout, backend):
    """Schemas, fake (meta) implementations and mutation annotations agree with the real ops."""
    x = torch.randn(2, 5, 7, device=DEVICE) if layout == "channels_first" else torch.randn(14, 5, device=DEVICE)
    codebook = torch.randn(11, 5, device=DEVICE)
    ops = torch.ops.vqfast
    q, idx, loss, _, counts, sums, _ = ops.quantize(x, codebook, True, 0.1, backend, "ieee")
    state = lambda: (torch.rand(11, device=DEVICE) + 1, torch.randn(11, 5, device=DEVICE),  # noqa: E731
                     codebook.clone(), torch.tensor(0.5, device=DEVICE),
                     torch.tensor(0, device=DEVICE))
    checks = [
        (ops.quantize.default, (x, codebook, True, 0.1, backend, "ieee")),
        (ops.quantize.default, (x, codebook, False, 0.2, backend, "ieee")),
        (ops.quantize_backward.default,
         (torch.randn_like(x), torch.tensor(0.5, device=DEVICE), x, codebook, idx, 0.1, 0.2, backend)),
        (ops.ema_update.default, (counts, sums, loss, None, *state(), 0.9, 1e-5, backend)),
        (ops.ema_update.default, (counts, sums, loss, torch.tensor(True, device=DEVICE), *state(),
                                  0.9, 1e-5, backend)),
    ]
    # the thin eager step's options: the learned codebook's gradient accumulator and usage
    # EMA, its re-seeding launch, the EMA update's fused re-seeding
    usage = lambda: (torch.rand(11, device=DEVICE), torch.tensor(0.5, device=DEVICE),  # noqa: E731
                     torch.tensor([3], device=DEVICE), 0.9)
    key, reseeded = torch.tensor([5], device=DEVICE), torch.tensor(0, device=DEVICE)
    checks += [
        (ops.quantize.default, (x, codebook, False, 0.2, backend, "ieee", True, *usage())),
        (ops.quantize_backward.default,
         (torch.randn_like(x), torch.tensor(0.5, device=DEVICE), x, codebook, idx, 0.1, 0.2,
          backend, torch.zeros(11, 5, device=DEVICE))),
        (ops.reseed_codes.default, (*usage()[:2], codebook.clone(), x, key.clone(),
                                    reseeded.clone(), 1e9 if backend == "triton" else 0.0,
                                    backend)),
        (ops.ema_update.default, (counts, sums, loss, None, *state(), 0.9, 1e-5, backend, None,
                                  None, x, key.clone(), reseeded.clone(),
                                  1e9 if backend == "triton" else 0.0)),
    ]
    if layout == "rows":
        checks.append((ops.nearest_code.default, (x, codebook, backend, "ieee")))
    for op, args in checks:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_ema_skips_non_finite_batches(backend):
    """No host sync inside the graph: the EMA update itself refuses a NaN batch on the device."""
    torch._dynamo.reset()
    vq = vqfast.VectorQuantizerEMA(13, 4, 0.25, backend=backend, **ORIGINAL).to(DEVICE)
    compiled = torch.compile(vq, fullgraph=True, backend="aot_eager")
    compiled(torch.randn(2, 4, 3, 3, device=DEVICE))  # a finite batch updates
    state = {k: v.clone() for k, v in tensor_state(vq).items()}
    z = torch.randn(2, 4, 3, 3, device=DEVICE)
    z[0, 1, 2, 2] = float("nan")
    compiled(z)
    for key, value in tensor_state(vq).items():
        if key != "skipped_batches":
            assert torch.equal(value, state[key]), key
    assert int(vq.skipped_batches) == 1
    compiled(torch.randn(2, 4, 3, 3, device=DEVICE))
    assert not torch.equal(vq.ema_weight, state["ema_weight"])


@pytest.mark.parametrize("kind", ["plain", "ema", "residual"])
def test_kmeans_and_dead_codes_compile_without_graph_breaks(kind):
    """The default options (k-means init, dead-code re-seeding) trace in one graph and
    train; a higher threshold than the default so that codes die within a few steps."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    vq = {"plain": lambda: vqfast.VectorQuantizer(23, 6, dead_code_threshold=4.0),
          "ema": lambda: vqfast.VectorQuantizerEMA(23, 6, dead_code_threshold=4.0),
          "residual": lambda: vqfast.ResidualVQ(2, 23, 6, dead_code_threshold=4.0)}[kind]().to(DEVICE)
    compiled = torch.compile(vq, fullgraph=True, backend="aot_eager")
    for step in range(4):
        z = torch.randn(2, 6, 5, 7, device=DEVICE) + 3.0 * step  # a drifting input: codes die
        z.requires_grad_()
        loss, q, _, _ = compiled(z)
        (loss + q.pow(2).sum()).backward()
        assert torch.isfinite(z.grad).all()
    assert bool(vq.initialized)  # k-means took
    codebook = vq.codebooks if kind == "residual" else vq.codebook
    assert torch.isfinite(codebook).all()
    assert int(vq.reseeded_codes.sum()) > 0  # the drift killed codes, which were re-seeded
