"""ResidualVQ's first ``n`` levels (``num_levels``), as codecs use it (EnCodec's bandwidths,
Mimi's ``num_quantizers``): against the oracle on the same codebooks, and against a module
built with ``n`` levels, in eval, encode and EMA / learned training."""

import pytest
import torch

import vqfast
from vqfast import reference

from _util import DEVICE, TOL

BACKENDS = ["torch", "triton"]


def _first_levels(codebooks, groups, q, n):
    return codebooks.view(groups, q, *codebooks.shape[1:])[:, :n].reshape(groups * n, *codebooks.shape[1:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups,shared", [(1, False), (2, False), (2, True)])
def test_first_levels_eval_and_encode_match_the_oracle(backend, groups, shared):
    q, n, k, d = 4, 2, 9, 6
    rvq = vqfast.ResidualVQ(q, k, d * groups, groups=groups, shared_codebook=shared,
                            backend=backend, kmeans_init=False).to(DEVICE).eval()
    x = torch.randn(3, d * groups, 5, device=DEVICE)
    loss, out, perplexity, codes = rvq(x, num_levels=n)
    assert codes.shape == (3, groups * n, 5) and perplexity.shape == (groups * n,)
    books = rvq.codebooks.detach() if shared else _first_levels(rvq.codebooks.detach(), groups, q, n)
    rows = x.movedim(1, -1).reshape(-1, d * groups)
    out_r, loss_r, idx_r, *_ = reference.residual_vq(rows, books, n, groups=groups)
    torch.testing.assert_close(out.movedim(1, -1).reshape(-1, d * groups), out_r, **TOL[torch.float32])
    torch.testing.assert_close(loss, loss_r, **TOL[torch.float32])
    assert torch.equal(codes.movedim(1, -1).reshape(-1, groups * n).t(), idx_r)
    # the codes are a prefix of the full search's, and decode to the same output
    full = rvq.encode(x)
    first = full.view(3, groups, q, 5)[:, :, :n].reshape(3, groups * n, 5)
    assert torch.equal(rvq.encode(x, num_levels=n), first) and torch.equal(codes, first)
    torch.testing.assert_close(rvq.decode_indices(codes, levels_dim=1), out.float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ema", [True, False])
def test_first_levels_train_only_their_codebooks_like_an_n_level_module(backend, ema):
    """Training on n of Q levels equals training an n-level module holding the same first
    codebooks; the other levels' codebooks and state are untouched."""
    q, n, k, d, groups = 3, 2, 7, 4, 2
    kwargs = dict(groups=groups, ema=ema, backend=backend, kmeans_init=False,
                  dead_code_threshold=0.0)
    torch.manual_seed(0)
    big = vqfast.ResidualVQ(q, k, d * groups, **kwargs).to(DEVICE)
    small = vqfast.ResidualVQ(n, k, d * groups, **kwargs).to(DEVICE)
    state = big.state_dict()
    for name, t in small.state_dict().items():  # the first n levels' state, per group
        if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == groups * n:
            t.copy_(_first_levels(state[name], groups, q, n))
    before = {name: t.clone() for name, t in big.state_dict().items() if isinstance(t, torch.Tensor)}
    x = torch.randn(2, d * groups, 5, device=DEVICE, requires_grad=True)
    for module, levels in ((big, {"num_levels": n}), (small, {})):
        loss, out, _, _ = module(x, **levels)
        (loss + out.sum()).backward()
    after_big, after_small = big.state_dict(), small.state_dict()
    for name, t in after_small.items():
        if not (isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == groups * n):
            continue
        torch.testing.assert_close(_first_levels(after_big[name], groups, q, n), t, msg=name)
        rest = after_big[name].view(groups, q, *t.shape[1:])[:, n:]
        assert torch.equal(rest, before[name].view(groups, q, *t.shape[1:])[:, n:]), name
    if not ema:
        grad = big.codebooks.grad.view(groups, q, k, d)
        torch.testing.assert_close(grad[:, :n].reshape(groups * n, k, d), small.codebooks.grad)
        assert not grad[:, n:].any()


def test_first_levels_with_defaults_and_dropout_leave_the_rest_untouched():
    torch.manual_seed(0)
    rvq = vqfast.ResidualVQ(4, 8, 6, quantize_dropout=True, backend="torch")
    x = torch.randn(2, 6, 9)
    rvq(x)  # k-means init of every level
    before = rvq.state_dict()["codebooks"][2:].clone()
    for _ in range(3):
        loss, out, perplexity, codes = rvq(x, num_levels=2)
        assert codes.shape == (2, 2, 9) and perplexity.shape == (2,)
    assert torch.equal(rvq.codebooks.detach()[2:], before)


@pytest.mark.parametrize("bad", [0, 5, 1.5, True, "2"])
def test_bad_num_levels_are_refused_before_anything_changes(bad):
    rvq = vqfast.ResidualVQ(4, 8, 6, backend="torch")
    before = {n: t.clone() for n, t in rvq.state_dict().items() if isinstance(t, torch.Tensor)}
    with pytest.raises(ValueError, match="num_levels"):
        rvq(torch.randn(2, 6, 3), num_levels=bad)
    with pytest.raises(ValueError, match="num_levels"):
        rvq.encode(torch.randn(2, 6, 3), num_levels=bad)
    assert all(torch.equal(t, before[n]) for n, t in rvq.state_dict().items() if n in before)


def _rows(t):
    """``[B, C, *spatial]`` -> ``[N, C]`` rows."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _first(codes, groups, q, n):
    """Levels-second codes ``[B, G*Q, ...]`` -> each group's first n levels."""
    return codes.view(codes.shape[0], groups, q, *codes.shape[2:])[:, :, :n].reshape(
        codes.shape[0], groups * n, *codes.shape[2:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_fsq_first_levels_match_the_oracle(backend):
    levels, q, n, groups = (8, 5, 3), 3, 2, 2
    rfsq = vqfast.ResidualFSQ(levels, q, groups=groups, backend=backend).to(DEVICE)
    z = torch.randn(2, 3 * groups, 5, device=DEVICE, requires_grad=True)
    out, codes = rfsq(z, num_levels=n)
    rows = _rows(z.detach()).requires_grad_()
    q_r, codes_r = reference.residual_fsq(rows, levels, q, groups, active_levels=n)
    assert codes.shape == (2, groups * n, 5)
    kept = codes_r.view(groups, q, -1)[:, :n].reshape(groups * n, -1)
    assert torch.equal(_rows(codes), kept.t())
    torch.testing.assert_close(_rows(out.detach()), q_r, **TOL[torch.float32])
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    (q_r * _rows(weight)).sum().backward()
    torch.testing.assert_close(_rows(z.grad), rows.grad, **TOL[torch.float32])
    assert torch.equal(rfsq.encode(z, num_levels=n), _first(rfsq.encode(z), groups, q, n))
    torch.testing.assert_close(rfsq.decode_indices(codes, levels_dim=1), out.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_lfq_first_levels_match_the_oracle(backend):
    dim, q, n, groups = 8, 3, 2, 2
    torch.manual_seed(3)
    rlfq = vqfast.ResidualLFQ(dim, q, groups=groups, inv_temperature=5.0,
                              backend=backend).to(DEVICE)
    z = torch.randn(2, dim, 5, device=DEVICE, requires_grad=True)
    loss, out, perplexity, codes = rlfq(z, num_levels=n)
    assert codes.shape == (2, groups * n, 5) and perplexity.shape == (groups * n,)
    rows = _rows(z.detach()).double().requires_grad_()
    loss_r, q_r, codes_r, _, _ = reference.residual_lfq(rows, q, groups, inv_temperature=5.0,
                                                        active_levels=n)
    kept = codes_r.view(groups, q, -1)[:, :n].reshape(groups * n, -1)
    assert torch.equal(_rows(codes), kept.t())
    torch.testing.assert_close(_rows(out.detach()), q_r.float(), **TOL[torch.float32])
    torch.testing.assert_close(loss.double(), loss_r, rtol=1e-5, atol=1e-6)
    (loss + out.sum()).backward()
    (loss_r + q_r.sum()).backward()
    torch.testing.assert_close(_rows(z.grad).double(), rows.grad, rtol=1e-4, atol=1e-6)
    assert torch.equal(rlfq.encode(z, num_levels=n), _first(rlfq.encode(z), groups, q, n))


@pytest.mark.parametrize("cls", ["ResidualFSQ", "ResidualLFQ"])
def test_residual_lookup_free_refuses_bad_num_levels(cls):
    module = vqfast.ResidualFSQ((5, 3), 2) if cls == "ResidualFSQ" else vqfast.ResidualLFQ(4, 2)
    for bad in (0, 3, 1.0):
        with pytest.raises(ValueError, match="num_levels"):
            module(torch.randn(2, module.dim, 3), num_levels=bad)
        with pytest.raises(ValueError, match="num_levels"):
            module.encode(torch.randn(2, module.dim, 3), num_levels=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_only_encode_op(backend):
    """``residual_codes``: the codes of the full op alone (mask: -1), and a sound custom op."""
    from vqfast.ops.residual_vq import residual_codes, residual_quantize
    x = torch.randn(2, 6, 5, device=DEVICE)
    books = torch.randn(4, 7, 3, device=DEVICE)
    mask = torch.rand(10, device=DEVICE) > 0.3
    for cosine in (False, True):
        codes = residual_codes(x, books, 2, groups=2, cosine=cosine, mask=mask, backend=backend)
        full = residual_quantize(x, books, 2, groups=2, cosine=cosine, mask=mask,
                                 backend=backend)[2]
        assert torch.equal(codes, full)
    torch.library.opcheck(torch.ops.vqfast.residual_codes.default,
                          (x, books, 2, 2, False, mask, backend, "ieee"))
