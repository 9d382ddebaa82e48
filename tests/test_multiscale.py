"""MultiScaleResidualVQ (VAR) against its oracle (vqfast.reference.multiscale_residual_vq)
on both backends: outputs, codes, losses, gradients (input, codebook, the Phi convs), the EMA
state, and the VQ-VAE built on it."""

import pytest
import torch
import torch.nn.functional as F

import vqfast
from vqfast import reference
from _util import BACKENDS, DEVICE, TOL, tensor_state

SCALES = (1, 2, 3, (4, 5), (5, 7))


def _make(backend, **kw):
    options = dict(scales=SCALES, kmeans_init=False, ema=False, backend=backend)
    options.update(kw)
    vq = vqfast.MultiScaleResidualVQ(37, 6, **options).to(DEVICE)
    if not vq.ema:
        with torch.no_grad():
            vq.codebook.normal_()
    return vq


def _oracle(vq, f, **kw):
    phis = [vq.quant_resi[i] for i in vq._phi_of_scale]
    return reference.multiscale_residual_vq(f, vq.codebook, vq.scales, phis,
                                            vq.commitment_cost, vq.upsample, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("upsample, share", [("bicubic", 4), ("nearest", 0), ("bilinear", 1)])
def test_learned_matches_the_oracle(upsample, share, backend):
    torch.manual_seed(0)
    vq = _make(backend, upsample=upsample, share_quant_resi=share)
    params = [vq.codebook] + list(vq.quant_resi.parameters())
    for _ in range(2):
        f = torch.randn(2, 6, 5, 7, device=DEVICE, requires_grad=True)
        loss, q, perplexity, codes = vq(f)
        assert codes.shape == (2, vq.sequence_length) and q.shape == f.shape
        f_ref = f.detach().clone().requires_grad_()
        loss_r, q_r, codes_r, _ = _oracle(vq, f_ref)
        assert all(torch.equal(a, b) for a, b in zip(vq.codes_per_scale(codes), codes_r))
        torch.testing.assert_close(q, q_r, **TOL[torch.float32])
        torch.testing.assert_close(loss, loss_r, **TOL[torch.float32])
        weight = torch.randn_like(q)
        grads = torch.autograd.grad(loss + (q * weight).sum(), [f] + params)
        grads_r = torch.autograd.grad(loss_r + (q_r * weight).sum(), [f_ref] + params)
        for g, g_r in zip(grads, grads_r):
            torch.testing.assert_close(g, g_r, rtol=1e-4, atol=1e-6)
        with torch.no_grad():  # one SGD step
            for p, g in zip(params, grads[1:]):
                p -= 0.1 * g
    vq.eval()
    f = torch.randn(2, 6, 5, 7, device=DEVICE)
    torch.testing.assert_close(vq.decode_indices(vq.encode(f)), vq(f)[1], **TOL[torch.float32])
    maps = vq.codes_per_scale(vq.encode(f))
    assert [tuple(m.shape[1:]) for m in maps] == vq.scales
    torch.testing.assert_close(vq.decode_indices(maps), vq(f)[1], **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_updates_once_per_step_from_every_scale(backend):
    torch.manual_seed(0)
    vq = _make(backend, ema=True, dead_code_threshold=0.0)
    with torch.no_grad():
        vq.codebook.normal_()
        vq.ema_weight.copy_(vq.codebook)
    size, weight = vq.ema_cluster_size.clone(), vq.ema_weight.clone()
    for _ in range(2):
        f = torch.randn(3, 6, 5, 7, device=DEVICE, requires_grad=True)
        codebook_before = vq.codebook.clone()
        loss, q, _, codes = vq(f)
        loss_r, q_r, codes_r, rests = reference.multiscale_residual_vq(
            f.detach(), codebook_before, vq.scales, [vq.quant_resi[i] for i in vq._phi_of_scale],
            vq.commitment_cost, vq.upsample)
        torch.testing.assert_close(q, q_r, **TOL[torch.float32])
        torch.testing.assert_close(loss, loss_r, **TOL[torch.float32])
        idx = torch.cat([c.reshape(-1) for c in codes_r])
        rows = torch.cat(rests)
        onehot = F.one_hot(idx, 37).float()
        size, weight, codebook = reference.ema_step(size, weight, onehot.sum(0), onehot.t() @ rows,
                                                    vq.decay, vq.epsilon)
        torch.testing.assert_close(vq.ema_cluster_size, size, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vq.codebook, codebook, rtol=1e-5, atol=1e-6)
        (loss + q.sum()).backward()  # the Phi convs learn; the codebook is a buffer
        assert vq.quant_resi[0].weight.grad is not None
        vq.zero_grad()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_code_takes_a_finest_scale_residual_in_the_update(backend):
    """Re-seeding runs in the EMA update's own pass on both backends: a dead code becomes
    one of the finest scale's residual rows (the search's input there), with the start size."""
    torch.manual_seed(0)
    vq = _make(backend, ema=True, dead_code_threshold=0.5, scales=(1, 2, 4))
    f = torch.randn(3, 6, 4, 4, device=DEVICE)
    vq(f)
    with torch.no_grad():  # code 5: never chosen, its corrected size far below the threshold
        vq.codebook[5] = vq.ema_weight[5] = 1e4
        vq.ema_cluster_size[5] = 1e-6 * vq.ema_decay_weight
    before = int(vq.reseeded_codes)
    rows = _finest_rests(vq, f)
    vq(f)
    assert int(vq.reseeded_codes) > before
    distance = (rows - vq.codebook[5].float()).abs().amax(1)
    assert float(distance.min()) == 0.0, "the re-seeded code is not one of the rows"
    start = max(vq.dead_code_threshold, 1.0) * float(vq.ema_decay_weight)
    torch.testing.assert_close(float(vq.ema_cluster_size[5]), start)


def _finest_rests(vq, f):
    """The rows the finest scale searches in ``vq``'s forward (the oracle's rests), with
    its codebook now (no state change)."""
    phis = [vq.quant_resi[i] for i in vq._phi_of_scale]
    with torch.no_grad():
        *_, rests = reference.multiscale_residual_vq(f, vq.codebook.float(), vq.scales, phis,
                                                     vq.commitment_cost, vq.upsample)
    return rests[-1]


def test_kmeans_init_dead_codes_breakdown_and_channel_last():
    torch.manual_seed(0)
    vq = vqfast.MultiScaleResidualVQ(32, 6, scales=(1, 2, 4), ema=True, backend="torch")
    f = torch.randn(4, 6, 4, 4) + 3.0  # far from VAR's tiny initial codes
    loss, q, perplexity, codes = vq(f, return_loss_breakdown=True)[:4]
    assert bool(vq.initialized) and float(perplexity) > 4
    with torch.no_grad():  # code 0: far away and nearly dead
        vq.codebook[0] = vq.ema_weight[0] = 100.0
        vq.ema_cluster_size[0] = 0.1
    vq(torch.randn(4, 6, 4, 4) + 3.0)
    assert int(vq.reseeded_codes) >= 1 and float(vq.codebook[0].abs().max()) < 20
    loss, *_, terms = vq(f, return_loss_breakdown=True)
    torch.testing.assert_close(sum(terms), loss.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms.codebook * vq.commitment_cost, terms.commitment)
    last = vqfast.MultiScaleResidualVQ(32, 6, scales=(1, 2, 4), ema=True, backend="torch",
                                       channel_last=True)
    last.load_state_dict(vq.state_dict())
    vq.eval()
    last.eval()
    out, out_last = vq(f), last(f.movedim(1, -1).contiguous())
    assert torch.equal(out[3], out_last[3])
    torch.testing.assert_close(out[1].movedim(1, -1), out_last[1])
    torch.testing.assert_close(last.decode_indices(out_last[3]), out_last[1])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="scale"):
        vqfast.MultiScaleResidualVQ(16, 4, scales=(1, 0))
    with pytest.raises(ValueError, match="upsample"):
        vqfast.MultiScaleResidualVQ(16, 4, upsample="area")
    with pytest.raises(ValueError, match="ema=True"):
        vqfast.MultiScaleResidualVQ(16, 4, ema=False, dead_code_threshold=1.0)
    assert vqfast.MultiScaleResidualVQ(16, 4).ema  # the default (README: Training quality)
    vq = vqfast.MultiScaleResidualVQ(16, 4, scales=(1, 2, 4), kmeans_init=False)
    with pytest.raises(ValueError, match="exceed"):
        vq(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"\[B, D, H, W\]"):
        vq(torch.randn(2, 4, 9))
    with pytest.raises(ValueError, match=r"\[B, 21\]"):
        vq.decode_indices(torch.zeros(2, 20, dtype=torch.int64))
    with pytest.raises(ValueError, match="lie in"):
        vq.decode_indices(torch.full((2, 21), 16))
    with pytest.raises(ValueError, match="per-scale codes"):
        vq.decode_indices([torch.zeros(2, 1, 1, dtype=torch.int64)])
    with pytest.raises(ValueError, match="state_dict"):
        vqfast.MultiScaleResidualVQ(16, 4, scales=(1, 4)).load_state_dict(vq.state_dict())


def test_compile_fullgraph_and_no_host_reads():
    from test_no_sync import HostReads
    for ema in (False, True):
        torch._dynamo.reset()
        vq = vqfast.MultiScaleResidualVQ(16, 4, scales=(1, 2, 4), ema=ema, backend="torch")
        vq(torch.randn(2, 4, 4, 4))  # k-means init (one host read, the first step only)
        before = {k: v.clone() for k, v in tensor_state(vq).items()}
        compiled = torch.compile(vq, fullgraph=True, backend="aot_eager")
        f = torch.randn(2, 4, 4, 4, requires_grad=True)
        loss, q, _, _ = compiled(f)
        (loss + q.sum()).backward()
        assert bool(torch.isfinite(f.grad).all())
        if ema:
            assert not torch.equal(vq.codebook, before["codebook"])  # the update survived
        with HostReads() as recorder:
            loss, q, _, _ = vq(f)
            (loss + q.sum()).backward()
        assert recorder.found == []


def test_vqvae_with_a_multiscale_quantizer():
    torch.manual_seed(0)
    model = vqfast.VQVAE(16, 1, 8, 32, 8, scales=(1, 2, 4), backend="torch")
    assert isinstance(model.vq, vqfast.MultiScaleResidualVQ) and not model.vq.ema
    x = torch.rand(2, 3, 16, 16) - 0.5
    loss, recon, perplexity, codes = model(x, return_codes=True)
    assert codes.shape == (2, 21) and recon.shape == x.shape
    (loss + recon.square().mean()).backward()
    model.eval()
    codes = model.encode(x)
    torch.testing.assert_close(model.decode_indices(codes), model(x)[1])
    ema = vqfast.VQVAE(16, 1, 8, 32, 8, decay=0.99, scales=(1, 2, 4), backend="torch")
    assert ema.vq.ema
