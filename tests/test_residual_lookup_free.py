"""ResidualFSQ and ResidualLFQ against their oracles (vqfast.reference.residual_fsq /
residual_lfq) on both backends, and against vector-quantize-pytorch where the definitions
coincide."""

import pytest
import torch

import vqfast
from vqfast import reference
from _util import BACKENDS, DEVICE, TOL


pytestmark = pytest.mark.kernels


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[B, C, *spatial]`` -> ``[N, C]``."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _fsq_ties(rows, levels, num_levels, groups):
    """Bool ``[N]``: vectors where some level's bounded value lies within rounding of a
    half step (either rounding is right there; the levels after it then differ too)."""
    c = len(levels)
    scales = reference.residual_fsq_scales(levels, num_levels)
    tie = torch.zeros(rows.shape[0], dtype=torch.bool)
    for g in range(groups):
        r = rows[:, g * c:(g + 1) * c].detach().float().cpu()
        for level in range(num_levels):
            bounded = reference.fsq_bound(r / scales[level], torch.tensor(levels))
            tie |= (((bounded - bounded.floor()) - 0.5).abs() < 1e-3).any(1)
            r = r - reference.fsq(r / scales[level], levels)[0] * scales[level]
    return tie.to(rows.device)


FSQ_CASES = [((8, 5, 5, 4), 3, 1), ((3,), 4, 2), ((8, 6, 4), 2, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("levels, num_levels, groups", FSQ_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_residual_fsq_matches_oracle(levels, num_levels, groups, dtype, backend):
    rfsq = vqfast.ResidualFSQ(levels, num_levels, groups=groups, backend=backend).to(DEVICE)
    channels = groups * len(levels)
    z = (1.5 * torch.randn(3, channels, 7, 5, device=DEVICE)).to(dtype).requires_grad_()
    q, codes = rfsq(z)
    assert q.dtype == dtype and q.shape == z.shape
    assert codes.shape == (3, groups * num_levels, 7, 5)
    rows = _rows(z.detach()).float().requires_grad_()
    q_ref, codes_ref = reference.residual_fsq(rows, levels, num_levels, groups)
    ok = ~_fsq_ties(rows, levels, num_levels, groups)
    assert float(ok.float().mean()) > 0.8
    assert torch.equal(_rows(codes)[ok], codes_ref.t()[ok])
    tol = TOL[dtype] if dtype != torch.float32 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_rows(q.detach()).float()[ok], q_ref.detach().to(dtype).float()[ok], **tol)
    torch.testing.assert_close(rfsq.decode_indices(codes).to(dtype), q.detach(), **tol)
    weight = torch.randn_like(q, dtype=torch.float32)
    (g,) = torch.autograd.grad(q, z, weight.to(dtype))
    (g_ref,) = torch.autograd.grad(q_ref, rows, _rows(weight.to(dtype)).float())
    torch.testing.assert_close(_rows(g).float()[ok], g_ref[ok],
                               **(TOL[dtype] if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-6)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_fsq_quantize_dropout_runs_the_first_levels(backend):
    levels, num_levels = (8, 5, 4), 4
    rfsq = vqfast.ResidualFSQ(levels, num_levels, groups=2, quantize_dropout=True,
                              backend=backend).to(DEVICE)
    seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        z = torch.randn(2, 6, 5, 3, device=DEVICE, requires_grad=True)
        q, codes = rfsq(z)
        dropped = (codes == -1).all(-1).all(-1).all(0).view(2, num_levels)  # [G, Q]
        n = int((~dropped[0]).sum())
        assert 1 <= n <= num_levels and torch.equal(dropped[0], dropped[1])
        assert bool((~dropped[:, :n]).all()) and bool(dropped[:, n:].all())
        seen.add(n)
        rows = _rows(z.detach()).requires_grad_()
        q_ref, codes_ref = reference.residual_fsq(rows, levels, num_levels, 2, active_levels=n)
        ok = ~_fsq_ties(rows, levels, n, 2)
        assert torch.equal(_rows(codes)[ok], codes_ref.t()[ok])
        torch.testing.assert_close(_rows(q.detach())[ok], q_ref.detach()[ok], rtol=1e-6, atol=1e-6)
        (g,) = torch.autograd.grad(q.sum(), z)
        (g_ref,) = torch.autograd.grad(q_ref.sum(), rows)
        torch.testing.assert_close(_rows(g)[ok], g_ref[ok], rtol=1e-4, atol=1e-6)
    assert len(seen) > 1
    rfsq.eval()  # every level in eval mode
    assert bool((rfsq(torch.randn(2, 6, 5, 3, device=DEVICE))[1] >= 0).all())


def test_residual_fsq_levels_refine_and_nan_inputs_get_code_minus_one():
    torch.manual_seed(0)
    z = torch.rand(4, 4, 64) * 1.6 - 0.8  # inside the bound's range
    errors = [float((vqfast.ResidualFSQ((8, 8, 8, 8), q)(z)[0] - z).abs().mean())
              for q in (1, 2, 3)]
    assert errors[2] < errors[1] < errors[0] / 2, errors  # (tanh's bend limits the gain)
    z[0, 1, 3] = float("nan")
    q, codes = vqfast.ResidualFSQ((8, 5, 4, 3), 2)(z)
    assert bool((codes[0, :, 3] == -1).all()) and int((codes == -1).sum()) == 2
    assert bool(q[0, :, 3].isnan().any())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim, num_levels, groups, dropout", [(6, 3, 1, False), (8, 2, 2, True),
                                                              (9, 2, 3, False)])
def test_residual_lfq_matches_oracle(dim, num_levels, groups, dropout, backend):
    torch.manual_seed(3)
    rlfq = vqfast.ResidualLFQ(dim, num_levels, groups=groups, quantize_dropout=dropout,
                              commitment_cost=0.3, diversity_gamma=0.8, inv_temperature=5.0,
                              backend=backend).to(DEVICE)
    z = torch.randn(3, dim, 5, 3, device=DEVICE, requires_grad=True)
    loss, q, perplexity, codes, terms = rlfq(z, return_loss_breakdown=True)
    n = int((codes.reshape(3, groups, num_levels, -1)[0, 0, :, 0] >= 0).sum())
    rows = _rows(z.detach()).double().requires_grad_()
    loss_r, q_r, codes_r, _, _ = reference.residual_lfq(
        rows, num_levels, groups, commitment_cost=0.3, diversity_gamma=0.8,
        inv_temperature=5.0, active_levels=n)
    assert torch.equal(_rows(codes), codes_r.t())
    torch.testing.assert_close(_rows(q.detach()), q_r.float(), **TOL[torch.float32])
    torch.testing.assert_close(loss.double(), loss_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(terms), loss.float(), rtol=1e-6, atol=1e-6)
    assert perplexity.shape == (groups * num_levels,)
    for level, level_codes in enumerate(codes_r):  # the notebook's formula per level
        used = level_codes[level_codes >= 0]
        p = torch.bincount(used, minlength=2**(dim // groups)).double() / max(len(used), 1)
        expected = torch.exp(-(p * torch.log(p + 1e-10)).sum())  # (1: a dropped level)
        torch.testing.assert_close(perplexity[level].double(), expected, rtol=1e-5, atol=1e-5)
    # (levels_dim: codes [3, G*Q, 5, 3] with G*Q = 3 fit the levels-last layout too)
    torch.testing.assert_close(rlfq.decode_indices(codes, levels_dim=1), q.detach())
    weight = torch.randn_like(q)
    (loss + (q * weight).sum()).backward()
    (loss_r + (q_r * _rows(weight).double()).sum()).backward()
    torch.testing.assert_close(_rows(z.grad).double(), rows.grad, rtol=1e-4, atol=1e-6)


def test_residual_lfq_projection_and_channel_last():
    torch.manual_seed(0)
    rlfq = vqfast.ResidualLFQ(12, 3, codebook_dim=4, groups=2, backend="torch")
    tokens = vqfast.ResidualLFQ(12, 3, codebook_dim=4, groups=2, backend="torch",
                                channel_last=True)
    tokens.load_state_dict(rlfq.state_dict())
    z = torch.randn(2, 12, 7)
    loss, q, _, codes = rlfq(z)
    loss_t, q_t, _, codes_t = tokens(z.transpose(1, 2).contiguous())
    assert codes.shape == (2, 6, 7) and codes_t.shape == (2, 7, 6)
    assert torch.equal(codes, codes_t.transpose(1, 2))
    torch.testing.assert_close(q, q_t.transpose(1, 2))
    torch.testing.assert_close(loss, loss_t)
    torch.testing.assert_close(rlfq.decode_indices(codes), q.detach(), **TOL[torch.float32])
    with pytest.raises(ValueError, match="state_dict"):
        vqfast.ResidualLFQ(12, 3, codebook_dim=6, groups=2).load_state_dict(rlfq.state_dict())


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="divisible by groups"):
        vqfast.ResidualLFQ(7, 2, groups=2)
    with pytest.raises(ValueError, match="num_quantizers"):
        vqfast.ResidualFSQ((8, 5), 0)
    with pytest.raises(ValueError, match="levels"):
        vqfast.ResidualFSQ((8, 1), 2)
    with pytest.raises(ValueError, match=r"\[1, 24\]"):
        vqfast.ResidualLFQ(25, 2)
    rfsq = vqfast.ResidualFSQ((8, 5), 2, groups=2)
    with pytest.raises(ValueError, match="channels"):
        rfsq(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"G=2 and n <= 2"):
        rfsq.decode_indices(torch.zeros(2, 6, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="lie in"):
        rfsq.decode_indices(torch.full((2, 4, 5), 40))
    coarse = rfsq.decode_indices(torch.zeros(2, 2, 5, dtype=torch.int64))  # first level only
    assert coarse.shape == (2, 4, 5)


def test_residual_fsq_agrees_with_vector_quantize_pytorch():
    """The peer's ResidualFSQ with plain FSQ levels (its default builds symmetry-preserving
    ones, another grid) and no input clamp: for even levels both scale level l by L**-l."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    from vector_quantize_pytorch.finite_scalar_quantization import FSQ as PeerFSQ
    levels, num_levels = [8, 6, 4], 3
    peer = vqp.ResidualFSQ(levels=levels, num_quantizers=num_levels, dim=3,
                           bound_hard_clamp=False)
    peer.layers = torch.nn.ModuleList(PeerFSQ(levels=levels) for _ in range(num_levels))
    ours = vqfast.ResidualFSQ(levels, num_levels, backend="torch", channel_last=True)
    torch.manual_seed(0)
    z = torch.randn(2, 50, 3)
    q_peer, codes_peer = peer(z)
    q, codes = ours(z)
    assert torch.equal(codes, codes_peer)
    torch.testing.assert_close(q, q_peer)


def test_residual_lfq_agrees_with_vector_quantize_pytorch():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    peer = vqp.ResidualLFQ(dim=6, codebook_size=2**6, num_quantizers=3,
                           entropy_loss_weight=0.1, diversity_gamma=1.0)
    ours = vqfast.ResidualLFQ(6, 3, commitment_cost=0.0, inv_temperature=100.0,
                              backend="torch", channel_last=True)
    torch.manual_seed(0)
    z = torch.randn(2, 40, 6) * 0.02  # small: the entropies are far from saturated
    q_peer, codes_peer, losses_peer = peer(z)
    loss, q, _, codes = ours(z)
    assert torch.equal(codes, codes_peer)
    torch.testing.assert_close(q, q_peer)
    torch.testing.assert_close(loss, losses_peer.sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_pass_opcheck(backend):
    from vqfast.ops.fsq import fsq_params
    params, basis = fsq_params([8, 5, 4])
    scales = reference.residual_fsq_scales([8, 5, 4], 3)
    to = lambda *ts: [t.to(DEVICE) for t in ts]  # noqa: E731
    params, basis, scales = to(params, basis, scales)
    active = torch.tensor(2, device=DEVICE)
    z = torch.randn(2, 6, 5, device=DEVICE)
    ops = torch.ops.vqfast
    for sign, store, slope in ((False, False, True), (False, False, False), (True, True, False)):
        torch.library.opcheck(ops.residual_scalar_forward.default,
                              (z, params, basis, scales, active, 2, sign, store, slope, backend))
    # the forward's slope is the fused backward's factor
    slope = ops.residual_scalar_forward(z, params, basis, scales, active, 2, False, False, True,
                                        backend)[3]
    grad = torch.randn_like(z)
    torch.testing.assert_close(
        ops.residual_fsq_backward(grad, z, params, scales, active, 2, backend), grad * slope)
    torch.library.opcheck(ops.residual_fsq_backward.default,
                          (torch.randn_like(z), z, params, scales, active, 2, backend))


def test_compile_fullgraph_and_no_host_reads():
    from test_no_sync import HostReads
    for module in (vqfast.ResidualFSQ((8, 5, 4), 3, groups=2, quantize_dropout=True),
                   vqfast.ResidualLFQ(6, 3, groups=2, quantize_dropout=True)):
        torch._dynamo.reset()
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        lfq = isinstance(module, vqfast.ResidualLFQ)

        def step(run):
            z = torch.randn(2, 6, 9, requires_grad=True)
            out = run(z)
            loss, quantized = (out[0], out[1]) if lfq else (0, out[0])
            (loss + quantized.square().sum()).backward()
            return z.grad

        for _ in range(2):
            assert bool(torch.isfinite(step(compiled)).all())
        with HostReads() as recorder:
            grad = step(module)
        assert recorder.found == [] and bool(torch.isfinite(grad).all())
