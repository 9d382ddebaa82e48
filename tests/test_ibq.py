"""IndexBackpropVQ (IBQ) against its plain [N, K] oracle (vqfast.reference.ibq): values,
codes and the gradients of the input and every code, the logits streamed in tiles."""

import pytest
import torch

import vqfast
from vqfast import reference
from _util import BACKENDS, DEVICE, TOL, tensor_state

pytestmark = pytest.mark.kernels


PATHS = [("torch", None), ("torch", 7)] + [("triton", None)] * ("triton" in BACKENDS)


@pytest.mark.parametrize("backend, tile", PATHS, ids=["torch-one-tile", "torch-many-tiles",
                                                      "triton"][:len(PATHS)])
@pytest.mark.parametrize("shape, scale", [((3, 7, (29,), 13), 1.0), ((2, 5, (3, 4), 301), 4.0),
                                          ((2, 40, (5,), 70), 0.5)])
def test_ibq_matches_the_oracle(shape, scale, backend, tile, monkeypatch):
    if tile is not None:  # tiles of 7 codes x N rows: the running max, sum and argmax carry
        monkeypatch.setattr(vqfast._torch.ibq, "_IBQ_TILE_ELEMENTS", 7 * shape[0] * shape[2][0] * (
            shape[2][1] if len(shape[2]) > 1 else 1))
    b, d, spatial, k = shape
    torch.manual_seed(0)
    vq = vqfast.IndexBackpropVQ(k, d, 0.3, logit_scale=scale, backend=backend).to(DEVICE)
    z = torch.randn(b, d, *spatial, device=DEVICE, requires_grad=True)
    loss, q, perplexity, codes = vq(z)
    rows = z.detach().movedim(1, -1).reshape(-1, d).double().requires_grad_()
    book = vq.codebook.detach().double().clone().requires_grad_()
    out_r, loss_r, idx_r = reference.ibq(rows, book, 0.3, scale)
    assert torch.equal(codes.reshape(-1), idx_r)
    torch.testing.assert_close(q.movedim(1, -1).reshape(-1, d), out_r.float(), **TOL[torch.float32])
    torch.testing.assert_close(loss.double(), loss_r, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(q)
    (loss + (q * w).sum()).backward()
    (loss_r + (out_r * w.movedim(1, -1).reshape(-1, d).double()).sum()).backward()
    torch.testing.assert_close(z.grad.movedim(1, -1).reshape(-1, d).double(), rows.grad,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vq.codebook.grad.double(), book.grad, rtol=1e-4, atol=1e-5)
    assert bool((vq.codebook.grad.abs().sum(1) > 0).all())  # every code gets a gradient
    counts = torch.bincount(idx_r, minlength=k).float()
    probs = counts / counts.sum()
    torch.testing.assert_close(perplexity, torch.exp(-(probs * torch.log(probs + 1e-10)).sum()))
    vq.eval()
    assert torch.equal(vq.encode(z), codes)
    torch.testing.assert_close(vq.decode_indices(codes), q.detach())


def test_ibq_never_builds_the_logits(monkeypatch):
    """The largest tensor a step allocates is a tile, not [N, K]: shrink the tile budget
    and the forward and backward still agree with one tile."""
    torch.manual_seed(0)
    vq = vqfast.IndexBackpropVQ(64, 4, backend="torch")
    z = torch.randn(2, 4, 10, requires_grad=True)
    loss, q, _, codes = vq(z)
    (loss + q.square().sum()).backward()
    grads = (z.grad.clone(), vq.codebook.grad.clone())
    z.grad, vq.codebook.grad = None, None
    monkeypatch.setattr(vqfast._torch.ibq, "_IBQ_TILE_ELEMENTS", 20)  # one code per tile
    sizes = []
    real_matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__",
                        lambda a, b: sizes.append(a.shape[:-1] + b.shape[1:]) or real_matmul(a, b))
    loss2, q2, _, codes2 = vq(z)
    (loss2 + q2.square().sum()).backward()
    assert torch.equal(codes, codes2)
    torch.testing.assert_close(z.grad, grads[0])
    torch.testing.assert_close(vq.codebook.grad, grads[1])
    assert max(s.numel() for s in sizes) <= 20 * 4  # [N, 1] tiles and [1, D] / [N, D] products


def test_ibq_layouts_state_and_breakdown():
    torch.manual_seed(0)
    first = vqfast.IndexBackpropVQ(32, 6)
    last = vqfast.IndexBackpropVQ(32, 6, channel_last=True)
    last.load_state_dict(first.state_dict())
    z = torch.randn(2, 6, 5)
    *out, terms = first(z, return_loss_breakdown=True)
    out_last = last(z.movedim(1, -1).contiguous())
    torch.testing.assert_close(out_last[1], out[1].movedim(1, -1))
    assert torch.equal(out_last[3], out[3])
    torch.testing.assert_close(sum(terms), out[0])
    frozen = vqfast.IndexBackpropVQ(32, 6, freeze_codebook=True)
    loss, q, _, _ = frozen(torch.randn(2, 6, 5, requires_grad=True))
    (loss + q.sum()).backward()
    assert frozen.codebook.grad is None
    with pytest.raises(ValueError, match="logit_scale"):
        vqfast.IndexBackpropVQ(32, 6, logit_scale=0)
    assert set(tensor_state(first)) == {"codebook"}


def test_ibq_compiles_fullgraph_and_reads_nothing_on_the_host():
    from test_no_sync import HostReads
    torch._dynamo.reset()
    vq = vqfast.IndexBackpropVQ(16, 4)
    compiled = torch.compile(vq, fullgraph=True, backend="aot_eager")
    z = torch.randn(2, 4, 9, requires_grad=True)
    loss, q, _, _ = compiled(z)
    (loss + q.sum()).backward()
    with HostReads() as recorder:
        loss, q, _, _ = vq(torch.randn(2, 4, 9, requires_grad=True))
        (loss + q.sum()).backward()
    assert recorder.found == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_ibq_custom_ops_pass_opcheck(backend):
    x, book = torch.randn(9, 5, device=DEVICE), torch.randn(13, 5, device=DEVICE)
    ops = torch.ops.vqfast
    for argmax_only in (False, True):
        torch.library.opcheck(ops.ibq_forward.default, (x, book, 2.0, argmax_only, backend))
    idx, lse, soft = ops.ibq_forward(x, book, 2.0, False, backend)
    torch.library.opcheck(ops.ibq_backward.default,
                          (torch.randn_like(x), x, book, idx, lse, soft, 2.0, backend))


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton path is not available here")
def test_ibq_kernels_take_rows_up_to_128_wide():
    wide = vqfast.IndexBackpropVQ(16, 129, backend="triton").to(DEVICE)
    with pytest.raises(ValueError, match="D <= 128"):
        wide(torch.randn(2, 129, 3, device=DEVICE))
    assert vqfast.IndexBackpropVQ(16, 129)._backend(torch.device("cuda")) == "torch"
