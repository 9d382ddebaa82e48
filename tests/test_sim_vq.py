"""SimVQ against its oracle (vqfast.reference.simvq) on both backends and against
vector-quantize-pytorch's SimVQ where the definitions coincide."""

import pytest
import torch

import vqfast
from vqfast import reference
from _util import BACKENDS, DEVICE, TOL, tensor_state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, basis_dim", [((3, 7, (11,), 13), None), ((2, 5, (3, 4), 9), 8)])
def test_simvq_matches_the_oracle(shape, basis_dim, backend):
    b, d, spatial, k = shape
    torch.manual_seed(0)
    vq = vqfast.SimVQ(k, d, 0.3, basis_dim=basis_dim, backend=backend).to(DEVICE)
    weight_ref = vq.code_transform.weight.detach().double().clone().requires_grad_()
    for _ in range(2):
        z = torch.randn(b, d, *spatial, device=DEVICE, requires_grad=True)
        loss, q, _, codes = vq(z)
        rows = z.detach().movedim(1, -1).reshape(-1, d).double().requires_grad_()
        out_r, loss_r, idx_r = reference.simvq(rows, vq.basis.double(), weight_ref, 0.3)
        assert torch.equal(codes.reshape(-1), idx_r)
        torch.testing.assert_close(q.movedim(1, -1).reshape(-1, d), out_r.float(), **TOL[torch.float32])
        torch.testing.assert_close(loss.double(), loss_r, rtol=1e-5, atol=1e-6)
        w = torch.randn_like(q)
        (loss + (q * w).sum()).backward()
        (loss_r + (out_r * w.movedim(1, -1).reshape(-1, d).double()).sum()).backward()
        torch.testing.assert_close(z.grad.movedim(1, -1).reshape(-1, d).double(), rows.grad,
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(vq.code_transform.weight.grad.double(), weight_ref.grad,
                                   rtol=1e-4, atol=1e-6)
        with torch.no_grad():  # one SGD step on both
            vq.code_transform.weight -= 0.5 * vq.code_transform.weight.grad
            weight_ref -= 0.5 * weight_ref.grad
        vq.code_transform.weight.grad = None
        weight_ref.grad = None
    vq.eval()
    z = torch.randn(b, d, *spatial, device=DEVICE)
    torch.testing.assert_close(vq.decode_indices(vq.encode(z)), vq(z)[1], **TOL[torch.float32])


def test_simvq_agrees_with_vector_quantize_pytorch():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    peer = vqp.SimVQ(dim=6, codebook_size=17, rotation_trick=False,
                     input_to_quantize_commit_loss_weight=0.25, channel_first=True)
    ours = vqfast.SimVQ(17, 6, 0.25, backend="torch")
    with torch.no_grad():
        ours.basis.copy_(peer.frozen_codebook)
        ours.code_transform.weight.copy_(peer.code_transform.weight)
    z = torch.randn(2, 6, 4, 5)
    q_peer, idx_peer, loss_peer = peer(z)
    loss, q, _, idx = ours(z)
    assert torch.equal(idx, idx_peer)
    torch.testing.assert_close(q, q_peer)
    torch.testing.assert_close(loss, loss_peer)


def test_simvq_state_frozen_basis_and_options():
    vq = vqfast.SimVQ(16, 4, backend="torch", freeze_codebook=True)
    before = {k: v.clone() for k, v in tensor_state(vq).items()}
    loss, q, _, _ = vq(torch.randn(2, 4, 9, requires_grad=True))
    loss.backward()
    assert vq.code_transform.weight.grad is None  # frozen: no gradient to the map
    assert all(torch.equal(v, before[k]) for k, v in tensor_state(vq).items())
    again = vqfast.SimVQ(16, 4)
    again.load_state_dict(vq.state_dict())  # the random basis travels with the state
    assert torch.equal(again.basis, vq.basis)
    with pytest.raises(ValueError, match="basis_dim"):
        vqfast.SimVQ(16, 4, basis_dim=8).load_state_dict(vq.state_dict())
    tokens = vqfast.SimVQ(16, 4, channel_last=True, rotation_trick=True)
    loss, q, _, codes = tokens(torch.randn(2, 7, 4, requires_grad=True),
                               mask=torch.rand(2, 7) > 0.3)
    assert q.shape == (2, 7, 4) and codes.shape == (2, 7)
    *_, terms = vqfast.SimVQ(16, 4)(torch.randn(2, 4, 9), return_loss_breakdown=True)
    torch.testing.assert_close(terms.codebook, terms.commitment / 0.25)


def test_simvq_compiles_fullgraph_and_reads_nothing_on_the_host():
    from test_no_sync import HostReads
    torch._dynamo.reset()
    vq = vqfast.SimVQ(16, 4, backend="torch")
    compiled = torch.compile(vq, fullgraph=True, backend="aot_eager")
    z = torch.randn(2, 4, 9, requires_grad=True)
    loss, q, _, _ = compiled(z)
    (loss + q.sum()).backward()
    with HostReads() as recorder:
        loss, q, _, _ = vq(torch.randn(2, 4, 9, requires_grad=True))
        (loss + q.sum()).backward()
    assert recorder.found == []
