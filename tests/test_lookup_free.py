"""FSQ and LFQ, module and functional, against the brute-force oracles of vqfast.reference."""

import pytest
import torch

import vqfast
from vqfast import reference
from vqfast.ops import lfq as lfq_ops
from _util import BACKENDS, DEVICE

pytestmark = pytest.mark.kernels


LEVELS = [[3], [2, 2], [8, 5, 5, 4], [7, 6, 5, 5, 5], [8, 8, 8, 6, 5]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("levels", LEVELS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fsq_matches_oracle(levels, dtype, backend):
    fsq = vqfast.FSQ(levels, backend=backend).to(DEVICE)
    z = (2 * torch.randn(3, len(levels), 7, 5, device=DEVICE)).to(dtype).requires_grad_()
    q, codes = fsq(z)
    q_ref, codes_ref = reference.fsq(z.movedim(1, -1), levels)
    assert q.dtype == dtype and q.shape == z.shape and codes.shape == (3, 7, 5)
    # Rounding ties: the bound within rounding of a half step may round either way.
    bounded = reference.fsq_bound(z.detach().movedim(1, -1), torch.tensor(levels)).movedim(-1, 1)
    tie = ((bounded - bounded.floor()) - 0.5).abs() < 1e-4
    expected = q_ref.movedim(-1, 1).to(dtype).float()  # (interpreter: bf16 rounds toward 0)
    slack = 2**-7 * expected.abs() if dtype == torch.bfloat16 else 0.0
    differ = (q.float() - expected).abs() > slack
    assert bool((differ <= tie).all()), bounded[differ & ~tie]
    assert bool(((codes != codes_ref) <= tie.any(1)).all())
    assert int(codes.min()) >= 0 and int(codes.max()) < fsq.codebook_size
    torch.testing.assert_close(fsq.decode_indices(codes).to(dtype), q, rtol=2**-7, atol=0)
    ulp = 2**-7 if dtype == torch.bfloat16 else 0.0
    grad = torch.randn_like(q)
    (g,) = torch.autograd.grad(q, z, grad)
    (g_ref,) = torch.autograd.grad(q_ref.movedim(-1, 1).to(dtype), z, grad)
    # (rtol 1e-4: the oracle takes atanh in fp32, ill-conditioned for two levels)
    torch.testing.assert_close(g.float(), g_ref.float(), rtol=2e-2 if ulp else 1e-4, atol=1e-6)


def test_fsq_grid_covers_every_code():
    levels = torch.tensor([5, 4, 3])
    fsq = vqfast.FSQ(levels.tolist(), backend="torch")
    codes = torch.arange(fsq.codebook_size).view(1, -1)
    grid = fsq.decode_indices(codes)  # [1, 3, 60]
    assert len({tuple(v) for v in grid[0].T.tolist()}) == 60
    assert grid.min() == -1 and grid.max() <= 1
    # Invert the bound at each grid point: quantizing there gives the code back.
    half_l = (levels - 1) * (1 + 1e-3) / 2
    offset = (levels % 2 == 0) * 0.5
    steps = grid[0].T * (levels // 2)
    z = torch.atanh((steps + offset) / half_l) - torch.atanh(offset / half_l)
    _, again = fsq(z.T.unsqueeze(0).float())
    assert torch.equal(again, codes)


def test_fsq_projection():
    fsq = vqfast.FSQ([8, 5, 5], dim=32)
    z = torch.randn(2, 32, 4, 4, requires_grad=True)
    q, codes = fsq(z)
    assert q.shape == z.shape and codes.shape == (2, 4, 4)
    torch.testing.assert_close(fsq.decode_indices(codes), q, rtol=1e-5, atol=1e-6)
    q.sum().backward()
    assert fsq.project_in.weight.grad is not None and z.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [1, 2, 5, 9, 12])
@pytest.mark.parametrize("inv_temperature", [1.0, 100.0])
def test_lfq_matches_brute_force_oracle(dim, inv_temperature, backend):
    lfq = vqfast.LFQ(dim, inv_temperature=inv_temperature, backend=backend).to(DEVICE)
    z = (0.5 * torch.randn(3, dim, 37, device=DEVICE)).requires_grad_()  # N = 111: odd
    loss, q, perplexity, codes = lfq(z)
    rows = z.movedim(1, -1).reshape(-1, dim)
    loss_ref, q_ref, codes_ref, _, _ = reference.lfq(rows.double(), inv_temperature=inv_temperature)
    assert torch.equal(codes.reshape(-1), codes_ref)
    torch.testing.assert_close(q.movedim(1, -1).reshape(-1, dim), q_ref.float())
    torch.testing.assert_close(loss, loss_ref.float(), rtol=1e-4, atol=1e-5)
    counts = torch.bincount(codes_ref, minlength=2**dim).float()
    probs = counts / counts.sum()
    torch.testing.assert_close(perplexity, torch.exp(-(probs * torch.log(probs + 1e-10)).sum()))
    (g,) = torch.autograd.grad(loss, z)
    (g_ref,) = torch.autograd.grad(loss_ref, z)
    # fp32 logits reach 2 * 100 * sum|x| ~ 1e3: exp(logit - lse) carries ~1e-4 relative error
    torch.testing.assert_close(g, g_ref.float(), rtol=1e-3, atol=5e-4 * float(g_ref.abs().max()))
    torch.testing.assert_close(lfq.decode_indices(codes), q.detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["rows", "channels_first"])
def test_fused_quantize_terms_and_each_gradient(layout, dtype, backend):
    """LFQ's fused pass (codes, counts, commitment, per-sample entropy) and the gradient of
    each output against the brute-force oracle, on x's rounded values; a NaN channel, and
    no entropy term."""
    d, cc, w, temperature = 11, 0.3, 0.7, 5.0
    torch.manual_seed(0)
    x = 0.4 * torch.randn(3, d, 29) if layout == "channels_first" else 0.4 * torch.randn(43, d)
    x = x.to(DEVICE, dtype).requires_grad_()
    q, commitment, entropy, codes, counts = lfq_ops.lfq_quantize(x, 1.0, cc, w, temperature,
                                                                 backend)
    rows = x.movedim(1, -1).reshape(-1, d) if layout == "channels_first" else x
    exact = rows.double()
    _, q_ref, codes_ref, entropy_ref, _ = reference.lfq(exact, inv_temperature=temperature)
    commitment_ref = cc * torch.nn.functional.mse_loss(exact, q_ref.detach())
    assert q.dtype == dtype and q.shape == x.shape and torch.equal(codes, codes_ref)
    q_rows = q.movedim(1, -1).reshape(-1, d) if layout == "channels_first" else q
    assert torch.equal(q_rows.double(), q_ref.detach())
    assert counts.dtype == torch.int32 and torch.equal(
        counts.long(), torch.bincount(codes_ref, minlength=2**d))
    torch.testing.assert_close(commitment.double(), commitment_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(entropy.double(), w * entropy_ref, rtol=1e-4, atol=1e-6)
    # each output's gradient alone, then all three (straight-through for q)
    grad_q = torch.randn_like(q_rows, dtype=torch.float64)
    outputs = {"q": ((q_rows.double() * grad_q).sum(), (q_ref * grad_q).sum()),
               "commitment": (commitment, commitment_ref), "entropy": (entropy, w * entropy_ref)}
    outputs["all"] = tuple(sum(pair[i] for pair in outputs.values()) for i in (0, 1))
    for name, (ours, ref) in outputs.items():
        (g,) = torch.autograd.grad(ours, x, retain_graph=True)
        (g_ref,) = torch.autograd.grad(ref, x, retain_graph=True)
        assert g.dtype == dtype, name
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(g.double(), g_ref.double(), rtol=tol,
                                   atol=tol * float(g_ref.abs().max()), msg=name)
    nan = x.detach().clone()
    nan.view(-1)[5] = float("nan")  # a NaN channel is not positive: its bit is 0
    _, commitment, _, codes, counts = lfq_ops.lfq_quantize(nan, 1.0, cc, 0.0, temperature, backend)
    nan_rows = nan.movedim(1, -1).reshape(-1, d) if layout == "channels_first" else nan
    assert torch.equal(codes, reference.lfq(nan_rows.double())[2])
    assert int(counts.sum()) == rows.shape[0] and torch.isnan(commitment)
    _, _, entropy, _, _ = lfq_ops.lfq_quantize(x.detach(), 1.0, cc, 0.0, temperature, backend)
    assert float(entropy) == 0.0
    # only q used: its gradient is the identity, even at an infinite input (no 0 * inf)
    inf = x.detach().clone()
    inf.view(-1)[3] = float("inf")
    inf.requires_grad_()
    q, *_ = lfq_ops.lfq_quantize(inf, 1.0, cc, w, temperature, backend)
    grad = torch.randn_like(q)
    (g,) = torch.autograd.grad(q, inf, grad)
    assert torch.equal(g, grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,w", [(torch.float32, 0.7), (torch.bfloat16, 0.7),
                                     (torch.float32, 0.0)], ids=str)
def test_fused_terms_of_slots_match_the_oracle(dtype, w, backend):
    """Residual LFQ's levels as slots (codes ±s_l, weights w_l, a dropped one) against the
    oracle: slot l's terms are LFQ's of x_l / s_l (commitment times s_l^2, the entropy at
    inv_temperature * s_l^2); gradients of each term and both."""
    torch.manual_seed(2)
    scales, weights = [1.0, 0.5, 0.25], [1.0, 0.0, 1.0]
    cc, temperature = 0.3, 3.0
    x = (0.6 * torch.randn(3, 23, 5, device=DEVICE)).to(dtype).requires_grad_()
    slot_scale = torch.tensor(scales, device=DEVICE)
    commitment, entropy = lfq_ops.lfq_terms(x, slot_scale, torch.tensor(weights, device=DEVICE),
                                            cc, w, temperature, backend)
    exact = x.double()
    commitment_ref = entropy_ref = 0.0
    for l, (s, on) in enumerate(zip(scales, weights)):
        _, q_ref, _, h_ref, _ = reference.lfq(exact[l] / s, inv_temperature=temperature * s * s)
        commitment_ref = commitment_ref + on * cc * s * s * torch.nn.functional.mse_loss(
            exact[l] / s, q_ref.detach())
        entropy_ref = entropy_ref + on * w * h_ref
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(commitment.double(), commitment_ref, **tol)
    torch.testing.assert_close(entropy.double(), entropy_ref, **tol)
    for name, ours, ref in (("commitment", commitment, commitment_ref),
                            ("entropy", entropy, entropy_ref),
                            ("both", commitment - 2 * entropy, commitment_ref - 2 * entropy_ref)):
        if not w and name == "entropy":
            assert float(entropy) == 0.0
            continue
        (g,) = torch.autograd.grad(ours, x, retain_graph=True)
        (g_ref,) = torch.autograd.grad(ref, x, retain_graph=True)
        assert g.dtype == dtype and not bool(g[1].any()), name  # the dropped slot: none
        scale = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(g.double(), g_ref.double(), rtol=scale,
                                   atol=scale * float(g_ref.abs().max()), msg=name)
    ops = torch.ops.vqfast
    args = (x.detach(), slot_scale, torch.tensor(weights, device=DEVICE), cc, w, temperature,
            backend)
    torch.library.opcheck(ops.lfq_terms.default, args)
    scalar = torch.tensor(0.7, device=DEVICE)
    torch.library.opcheck(ops.lfq_terms_backward.default, (scalar, scalar * 2, *args))
    with pytest.raises(ValueError, match="slot_scale"):  # no gradient to the slots' options
        lfq_ops.lfq_terms(x, slot_scale.requires_grad_(), args[2], cc, w, temperature, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_quantize_on_the_sphere_matches_bsq(backend):
    """BSQ's scale (codes ±1/sqrt(d)) through the fused pass against the BSQ oracle, on unit
    vectors (the oracle's normalisation then changes nothing)."""
    d, cc, w, temperature = 7, 0.3, 0.7, 9.0
    torch.manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(2, d, 19, device=DEVICE), dim=1)
    q, commitment, entropy, codes, _ = lfq_ops.lfq_quantize(u, d ** -0.5, cc, w, temperature,
                                                            backend)
    rows = u.movedim(1, -1).reshape(-1, d).double()
    _, q_ref, codes_ref, entropy_ref, _ = reference.bsq(rows, inv_temperature=temperature)
    assert torch.equal(codes, codes_ref)
    torch.testing.assert_close(q.movedim(1, -1).reshape(-1, d).double(), q_ref.detach())
    commitment_ref = cc * torch.nn.functional.mse_loss(rows, q_ref.detach())
    torch.testing.assert_close(commitment.double(), commitment_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(entropy.double(), w * entropy_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_quantize_ops_pass_opcheck(backend):
    """Schemas and fake implementations of LFQ's fused ops agree with the real ones."""
    ops = torch.ops.vqfast
    for x, weight in ((torch.randn(2, 5, 7, device=DEVICE), 0.5),
                      (torch.randn(9, 3, device=DEVICE).half(), 0.0)):
        torch.library.opcheck(ops.lfq_quantize.default, (x, 0.5, 0.25, weight, 3.0, backend))
        scalar = torch.tensor(0.7, device=DEVICE)
        for grad_q in (torch.randn_like(x), None):  # (None: q took no gradient)
            torch.library.opcheck(ops.lfq_quantize_backward.default,
                                  (grad_q, scalar, scalar * 2, x, 0.5, 0.25, weight, 3.0, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_codebook_entropy_and_gradient(dtype, backend):
    """The streamed entropy against the brute-force one on the same (rounded) inputs."""
    x = (0.3 * torch.randn(53, 10, device=DEVICE)).to(dtype).requires_grad_()
    entropy = lfq_ops.codebook_entropy(x, 10.0, backend)
    *_, entropy_ref = reference.lfq(x.double(), inv_temperature=10.0)
    torch.testing.assert_close(entropy, entropy_ref.float(), rtol=1e-4, atol=1e-5)
    (g,) = torch.autograd.grad(entropy, x)
    (g_ref,) = torch.autograd.grad(entropy_ref, x)
    assert g.dtype == dtype
    torch.testing.assert_close(g.float(), g_ref.float(), rtol=2e-2 if dtype != torch.float32 else 1e-3,
                               atol=1e-4 * float(g_ref.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_codebook_entropy_of_a_batch_is_each_slots(backend):
    """A batch of slots ``[slots, N, d]`` (residual LFQ's levels, one launch each way) gives
    each slot's entropy and gradient, as one call per slot does."""
    x = (0.3 * torch.randn(3, 29, 6, device=DEVICE)).requires_grad_()
    weights = torch.tensor([0.5, -1.0, 2.0], device=DEVICE)
    batch = lfq_ops.codebook_entropy(x, 7.0, backend, batched=True)
    with pytest.raises(ValueError, match="rows"):  # [B, d, S] is not read as slots by default
        lfq_ops.codebook_entropy(x, 7.0, backend)
    (g,) = torch.autograd.grad((batch * weights).sum(), x)
    assert batch.shape == (3,)
    for slot in range(3):
        row = x[slot].detach().requires_grad_()
        *_, entropy_ref = reference.lfq(row.double(), inv_temperature=7.0)
        torch.testing.assert_close(batch[slot].double(), entropy_ref, rtol=1e-4, atol=1e-6)
        (g_ref,) = torch.autograd.grad(entropy_ref * float(weights[slot]), row)
        torch.testing.assert_close(g[slot], g_ref.float(), rtol=1e-3,
                                   atol=1e-4 * float(g_ref.abs().max()))


def test_lfq_entropy_memory_is_tiled(monkeypatch):
    """The torch path works in [rows, codes] tiles: shrink the tile and get the same result."""
    from vqfast import _torch
    x = torch.randn(40, 7)
    whole = lfq_ops.codebook_entropy(x, 5.0, "torch")
    monkeypatch.setattr(_torch._common, "_CHUNK_ELEMENTS", 96)  # 96 codes x 1 row per tile
    torch.testing.assert_close(lfq_ops.codebook_entropy(x, 5.0, "torch"), whole)


@pytest.mark.parametrize("cls,args", [(vqfast.FSQ, ([8, 5],)), (vqfast.LFQ, (2,))])
def test_bad_inputs_raise(cls, args):
    quantizer = cls(*args)
    with pytest.raises(ValueError, match="channels"):
        quantizer(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="fp32"):
        quantizer(torch.randn(2, 2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="spatial"):
        quantizer(torch.randn(2, 2))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="levels"):
        vqfast.FSQ([8, 1])
    with pytest.raises(ValueError, match="dim"):
        vqfast.LFQ(25)
    with pytest.raises(ValueError, match="precision"):
        vqfast.LFQ(4, precision="tf32")


@pytest.mark.parametrize("cls,args,kw", [(vqfast.FSQ, ([8, 5, 5],), {}), (vqfast.LFQ, (6,), {}),
                                         (vqfast.LFQ, (6,), dict(spherical=True))])
def test_compiles_fullgraph(cls, args, kw):
    torch._dynamo.reset()
    quantizer = cls(*args, **kw)
    compiled = torch.compile(quantizer, fullgraph=True, backend="aot_eager")
    z = torch.randn(2, quantizer.dim, 3, 5, requires_grad=True)
    eager_out, compiled_out = quantizer(z), compiled(z)
    for a, b in zip(eager_out, compiled_out):
        torch.testing.assert_close(b, a)


def test_codebook_entropy_agrees_with_vector_quantize_pytorch():
    """Where the definitions coincide (no subsampling), the peer's batch entropy over its
    materialised [N, 2**d] probabilities equals vqfast's streamed one."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    d = 7
    z = 0.2 * torch.randn(4, d, 6, 5)
    peer = vqp.LFQ(dim=d, codebook_size=2**d, frac_per_sample_entropy=1.0, channel_first=True)
    _, breakdown = peer(z, return_loss_breakdown=True)  # ((quantized, codes, loss), losses)
    ours = lfq_ops.codebook_entropy(z.movedim(1, -1).reshape(-1, d), 100.0, "torch")
    torch.testing.assert_close(ours, breakdown.batch_entropy, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_lookup_free_benchmark_pipeline(tmp_path):
    from benchmarks import lookup_free
    lookup_free.main(["--dims", "6", "--bsq-dims", "5", "--n", "256", "--out", str(tmp_path),
                      "--name", "lf"])
    rows = __import__("json").loads((tmp_path / "lf.json").read_text())["results"]
    exact = [r for r in rows if r["impl"] == "vqfast (exact)"]
    assert exact and exact[0]["entropy_error"] == 0 and exact[0]["median_ms"] > 0
    assert {r["quantizer"] for r in rows} == {"lfq", "bsq", "fsq"}
    assert all(r["entropy_error"] == 0 for r in exact)


# --- binary spherical quantization (LFQ(spherical=True)) ---------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [1, 2, 5, 9])
@pytest.mark.parametrize("inv_temperature", [1.0, 100.0])
def test_bsq_matches_brute_force_oracle(dim, inv_temperature, backend):
    bsq = vqfast.LFQ(dim, inv_temperature=inv_temperature, spherical=True,
                     backend=backend).to(DEVICE)
    z = torch.randn(3, dim, 37, device=DEVICE).requires_grad_()
    loss, q, _, codes = bsq(z)
    rows = z.movedim(1, -1).reshape(-1, dim)
    loss_ref, q_ref, codes_ref, _, _ = reference.bsq(rows.double(), inv_temperature=inv_temperature)
    assert torch.equal(codes.reshape(-1), codes_ref)
    torch.testing.assert_close(q.movedim(1, -1).reshape(-1, dim), q_ref.float())
    assert torch.allclose(q.detach().norm(dim=1), torch.ones(()))  # on the unit sphere
    torch.testing.assert_close(loss, loss_ref.float(), rtol=1e-4, atol=1e-5)
    (g,) = torch.autograd.grad(loss + (q * torch.linspace(-1, 1, q.numel()).view_as(q)).sum(), z)
    (g_ref,) = torch.autograd.grad(
        loss_ref + (q_ref * torch.linspace(-1, 1, q.numel()).view_as(q).movedim(1, -1)
                    .reshape(-1, dim).double()).sum(), z)
    # (d = 1: the normalisation's gradient is 0 exactly; fp32 leaves ~1e-4 / |z| of rounding)
    torch.testing.assert_close(g, g_ref.float(), rtol=1e-3,
                               atol=5e-4 * float(g_ref.abs().max()) + 2e-4)
    torch.testing.assert_close(bsq.decode_indices(codes), q.detach())


def test_bsq_exact_entropy_against_the_group_factorised_approximation():
    """The paper's approximation sums the entropies of groups of bits: equal to the exact
    entropy with one group, above it (subadditivity) with more, and its gradient differs."""
    d = 8
    z = torch.randn(400, d, dtype=torch.float64)
    z[:, 4:] += 0.8 * z[:, :4]  # correlated bit groups: the approximation overestimates
    z.requires_grad_()
    *_, exact = reference.bsq(z, inv_temperature=10.0)
    one_group = reference.bsq_grouped_codebook_entropy(z, 1, inv_temperature=10.0)
    two_groups = reference.bsq_grouped_codebook_entropy(z, 2, inv_temperature=10.0)
    torch.testing.assert_close(one_group, exact)
    assert float(two_groups.detach()) > float(exact.detach()) + 1e-3
    ours = lfq_ops.codebook_entropy(
        torch.nn.functional.normalize(z.detach().float(), dim=1) / d**0.5, 10.0, "torch")
    torch.testing.assert_close(ours, exact.float(), rtol=1e-5, atol=1e-6)
    (g_exact,) = torch.autograd.grad(exact, z)
    (g_approx,) = torch.autograd.grad(two_groups, z)
    cosine = torch.nn.functional.cosine_similarity(g_exact.flatten(), g_approx.flatten(), dim=0)
    assert float(cosine) < 0.999


def test_bsq_agrees_with_vector_quantize_pytorch():
    """vector-quantize-pytorch's LFQ(spherical=True) has the same codes and entropies."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    d = 7
    z = torch.randn(4, d, 6, 5)
    peer = vqp.LFQ(dim=d, codebook_size=2**d, frac_per_sample_entropy=1.0, channel_first=True,
                   spherical=True)
    (q_peer, codes_peer, _), breakdown = peer(z, return_loss_breakdown=True)
    ours = vqfast.LFQ(d, spherical=True, backend="torch")
    _, q, _, codes = ours(z)
    assert torch.equal(codes, codes_peer)
    torch.testing.assert_close(q, q_peer)
    rows = z.movedim(1, -1).reshape(-1, d)
    u = torch.nn.functional.normalize(rows, dim=1) / d**0.5
    torch.testing.assert_close(lfq_ops.codebook_entropy(u, 100.0, "torch"),
                               breakdown.batch_entropy, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reference.bsq(rows)[3], breakdown.per_sample_entropy,
                               rtol=1e-3, atol=1e-5)
