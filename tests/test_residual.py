"""ResidualVQ (residual, grouped, shared, cosine, factorized, rotation trick, mask,
quantize dropout), module and functional, against the brute-force oracle
``vqfast.reference.residual_vq`` (gradients by autograd of its formulas)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import vqfast
from vqfast import reference
from vqfast.ops.residual_vq import residual_quantize
from _util import ORIGINAL, BACKENDS, DEVICE, TOL, tensor_state
from test_no_sync import HostReads, single_rank_group  # noqa: F401 (a fixture)

pytestmark = pytest.mark.kernels

# (B, D, spatial, K, groups, levels): odd sizes everywhere.
SHAPES = [(3, 12, (7, 5), 13, 1, 3), (2, 18, (11,), 9, 3, 2), (1, 5, (3, 3, 3), 7, 1, 4),
          (1, 140, (9,), 11, 2, 2)]  # group width 70: several channel chunks per kernel loop
OPTIONS = {
    "plain": {},
    "shared": dict(shared=True),
    "cosine": dict(cosine=True),
    "rotation": dict(rotation_trick=True),
    "mask": dict(mask=True),
    "dropout": dict(active=2),
    "all": dict(cosine=True, rotation_trick=True, mask=True, active=1),
}


def _flat(z):
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def _case(shape, shared=False, cosine=False, mask=False, active=None, rotation_trick=False):
    b, d, spatial, k, groups, levels = shape
    z = torch.randn(b, d, *spatial, device=DEVICE)
    books = groups * (1 if shared else levels)
    codebooks = torch.randn(books, k, d // groups, device=DEVICE) * 0.7
    if cosine:
        codebooks = F.normalize(codebooks, dim=-1)
    m = (torch.rand(b, *spatial, device=DEVICE) > 0.3) if mask else None
    act = torch.tensor(active, device=DEVICE) if active is not None else None
    return z, codebooks, m, act, dict(groups=groups, cosine=cosine, rotation_trick=rotation_trick)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ema", [True, False], ids=["ema", "learned"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_functional_matches_oracle(shape, option, ema, backend):
    """Output, loss, codes, statistics and the gradients of x and the codebooks."""
    levels = shape[-1]
    z, codebooks, mask, active, kw = _case(shape, **OPTIONS[option])
    if active is not None and int(active) > levels:
        active = torch.tensor(levels, device=DEVICE)
    flat_mask = mask.reshape(-1) if mask is not None else None
    x = z.reshape(z.shape[0], z.shape[1], -1).clone().requires_grad_()
    books = codebooks.clone().requires_grad_()
    q, loss, idx, perplexity, counts, code_sums, _ = residual_quantize(
        x, books, levels, active=active, mask=flat_mask, commitment_cost=0.25,
        codebook_loss=not ema, with_code_sums=True, backend=backend, **kw)
    x_ref = _flat(z).clone().requires_grad_()
    books_ref = codebooks.clone().requires_grad_()
    out_r, loss_r, idx_r, sq_r, counts_r, sums_r = reference.residual_vq(
        x_ref, books_ref, levels, commitment_cost=0.25, ema=ema, active_levels=active,
        mask=flat_mask, **kw)
    assert idx.shape == idx_r.shape and idx.dtype == torch.int64
    assert torch.equal(idx, idx_r), "random inputs should not tie"
    torch.testing.assert_close(_flat(q.view_as(z)), out_r.detach(), **TOL[torch.float32])
    torch.testing.assert_close(loss, loss_r, **TOL[torch.float32])
    assert torch.equal(counts.long(), counts_r)
    torch.testing.assert_close(code_sums, sums_r, rtol=1e-5, atol=1e-5)
    weight = torch.randn_like(q)
    (loss + (q * weight).sum()).backward()
    (loss_r + (out_r * _flat(weight.view_as(z))).sum()).backward()
    torch.testing.assert_close(_flat(x.grad.view_as(z)), x_ref.grad, rtol=1e-4, atol=1e-5)
    if ema:
        assert books.grad is None
    else:
        torch.testing.assert_close(books.grad, books_ref.grad, rtol=1e-4, atol=1e-5)
    assert perplexity.shape == (kw["groups"] * levels,)
    p = counts_r.double() / counts_r.sum(1, keepdim=True).clamp_min(1)  # the notebook's formula
    torch.testing.assert_close(perplexity.double(), torch.exp(-(p * torch.log(p + 1e-10)).sum(1)),
                               rtol=1e-5, atol=1e-5)


def _oracle_state(rvq):
    return [t.detach().clone().double() for t in (rvq.codebooks, rvq.ema_cluster_size,
                                                  rvq.ema_weight)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ["plain", "shared", "cosine", "mask", "dropout"])
def test_ema_steps_match_oracle(option, backend):
    """Five EMA training steps: every level's state against the oracle's update."""
    b, d, spatial, k, groups, levels = (2, 12, (9, 5), 11, 2, 3)
    opts = OPTIONS[option]
    rvq = vqfast.ResidualVQ(levels, k, d, groups=groups, shared_codebook=opts.get("shared", False),
                            cosine=opts.get("cosine", False),
                            quantize_dropout=option == "dropout", backend=backend, **ORIGINAL).to(DEVICE)
    codebooks, size, weight = _oracle_state(rvq)
    for step in range(5):
        z = torch.randn(b, d, *spatial, device=DEVICE)
        mask = (torch.rand(b, *spatial, device=DEVICE) > 0.3) if option == "mask" else None
        gen = torch.get_rng_state() if DEVICE.type == "cpu" else torch.cuda.get_rng_state()
        loss, q, perplexity, codes = rvq(z, mask=mask)
        if option == "dropout":  # the draw the module made
            (torch.set_rng_state if DEVICE.type == "cpu" else torch.cuda.set_rng_state)(gen)
            active = int(torch.randint(1, levels + 1, (), device=DEVICE))
            dropped = [g * levels + l for g in range(groups) for l in range(active, levels)]
            assert bool((codes[:, dropped] == -1).all())
        else:
            active = levels
        out_r, loss_r, idx_r, _, counts_r, sums_r = reference.residual_vq(
            _flat(z).double(), codebooks, levels, groups=groups, cosine=opts.get("cosine", False),
            active_levels=active, mask=mask.reshape(-1) if mask is not None else None)
        assert torch.equal(codes.movedim(1, 0).reshape(groups * levels, -1), idx_r)
        torch.testing.assert_close(_flat(q), out_r.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss.double(), loss_r, rtol=1e-5, atol=1e-6)
        if opts.get("shared"):
            counts_r = counts_r.view(groups, levels, k).sum(1)
            sums_r = sums_r.view(groups, levels, k, -1).sum(1)
        for book in range(codebooks.shape[0]):
            if not opts.get("shared") and book % levels >= active:
                continue  # a dropped level keeps its state
            size[book], weight[book], codebooks[book] = reference.ema_step(
                size[book], weight[book], counts_r[book].double(), sums_r[book], 0.99, 1e-5,
                cosine=opts.get("cosine", False))
        torch.testing.assert_close(rvq.ema_cluster_size.double(), size, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rvq.ema_weight.double(), weight, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rvq.codebooks.double(), codebooks, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_indices_and_prefixes(backend):
    rvq = vqfast.ResidualVQ(4, 16, 10, groups=2, codebook_dim=3, backend=backend, **ORIGINAL).to(DEVICE).eval()
    z = torch.randn(2, 10, 6, 5, device=DEVICE)
    _, q, _, codes = rvq(z)
    assert codes.shape == (2, 8, 6, 5) and q.shape == z.shape
    torch.testing.assert_close(rvq.decode_indices(codes), q, rtol=1e-5, atol=1e-5)
    # The first n levels of each group decode the first n levels: n = 2 here.
    first = codes.view(2, 2, 4, 6, 5)[:, :, :2].reshape(2, 4, 6, 5)
    dropped = codes.view(2, 2, 4, 6, 5).clone()
    dropped[:, :, 2:] = -1
    torch.testing.assert_close(rvq.decode_indices(first),
                               rvq.decode_indices(dropped.view(2, 8, 6, 5)))
    with pytest.raises(ValueError, match="G\\*n"):
        rvq.decode_indices(codes[:, :3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_codebook_dim_projects(backend):
    rvq = vqfast.ResidualVQ(2, 8, 24, codebook_dim=4, ema=False, backend=backend, **ORIGINAL).to(DEVICE)
    z = torch.randn(2, 24, 7, device=DEVICE, requires_grad=True)
    loss, q, _, codes = rvq(z)
    assert rvq.codebooks.shape == (2, 8, 4) and q.shape == z.shape
    (loss + q.square().sum()).backward()
    for p in (rvq.codebooks, rvq.project_in.weight, rvq.project_out.weight, z):
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_positions_pass_through(backend):
    rvq = vqfast.ResidualVQ(3, 8, 6, codebook_dim=4, backend=backend, **ORIGINAL).to(DEVICE)
    z = torch.randn(2, 6, 10, device=DEVICE)
    mask = torch.rand(2, 10, device=DEVICE) > 0.5
    state = copy.deepcopy(rvq.state_dict())
    _, q, _, codes = rvq(z, mask=mask)
    torch.testing.assert_close(q.movedim(1, -1)[~mask], z.movedim(1, -1)[~mask])
    assert bool((codes.movedim(1, -1)[~mask] == -1).all())
    assert bool((codes.movedim(1, -1)[mask] >= 0).all())
    # Masked positions change nothing: with them replaced by garbage the state is the same.
    after = copy.deepcopy(rvq.state_dict())
    rvq.load_state_dict(state)
    z2 = torch.where(mask[:, None], z, 1e3 * torch.randn_like(z))
    rvq(z2, mask=mask)
    for key, value in tensor_state(rvq).items():
        torch.testing.assert_close(value, after[key], rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_before_state_changes():
    rvq = vqfast.ResidualVQ(2, 8, 6, backend="torch", **ORIGINAL)
    state = copy.deepcopy(rvq.state_dict())
    z = torch.randn(2, 6, 5)
    with pytest.raises(ValueError, match="channels"):
        rvq(torch.randn(2, 5, 5))
    with pytest.raises(TypeError, match="bool"):
        rvq(z, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="shape"):
        rvq(z, mask=torch.ones(2, 4, dtype=torch.bool))
    for key, value in tensor_state(rvq).items():
        assert torch.equal(value, state[key])
    with pytest.raises(ValueError, match="divisible"):
        vqfast.ResidualVQ(2, 8, 7, groups=2, **ORIGINAL)
    with pytest.raises(ValueError, match="ema=True"):
        vqfast.ResidualVQ(2, 8, 6, ema=False, dead_code_threshold=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_dead_codes_and_usage(backend):
    torch.manual_seed(1)
    rvq = vqfast.ResidualVQ(2, 16, 4, kmeans_init=True, dead_code_threshold=2.0,
                            backend=backend).to(DEVICE)
    z = torch.randn(4, 4, 50, device=DEVICE)
    rvq(z)
    assert bool(rvq.initialized) and torch.allclose(rvq.ema_decay_weight,
                                                    torch.ones(2, device=DEVICE), atol=1e-2)
    for _ in range(20):
        rvq(torch.randn(4, 4, 50, device=DEVICE))
    usage = rvq.codebook_usage()
    assert len(usage) == 2 and all(u.usage.shape == (16,) for u in usage)
    assert all(u.alive_codes + u.dead_codes == 16 for u in usage)
    # A k-means checkpoint loads into a fresh module and is not re-initialised.
    fresh = vqfast.ResidualVQ(2, 16, 4, kmeans_init=True, backend=backend).to(DEVICE)
    fresh.load_state_dict(rvq.state_dict())
    assert fresh._kmeans_done


def test_half_keeps_ema_state_fp32_and_amp():
    rvq = vqfast.ResidualVQ(2, 8, 6, backend="torch", **ORIGINAL).half()
    assert rvq.codebooks.dtype == torch.float32 and rvq.ema_weight.dtype == torch.float32
    _, q, _, _ = rvq(torch.randn(2, 6, 5).half())
    assert q.dtype == torch.float16


def _peer():
    return pytest.importorskip("vector_quantize_pytorch")


def _copy_peer_codebook(ours, book, codebook):
    """Our codebook ``book`` from one of the peer's codebooks, with its EMA state (the peer
    starts ``cluster_size`` at 1 and ``embed_avg`` at the codes, the seed at 0 and the
    codes: copied, one training step has the same definition in both)."""
    with torch.no_grad():
        ours.codebooks[book] = codebook.embed[0]
        ours.ema_weight[book] = codebook.embed_avg[0]
        ours.ema_cluster_size[book] = codebook.cluster_size[0]


def _peer_codebooks(layers):
    return torch.stack([layer._codebook.embed[0] for layer in layers])


@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
def test_cross_check_vector_quantize_pytorch(cosine):
    """Same codebooks and inputs, one training step: the peer's ResidualVQ chooses the same
    codes, gives the same output and commitment loss (with ``use_cosine_sim`` too: both
    normalise each residual and sum unit codes) and leaves the same EMA codebooks."""
    vqp = _peer()
    torch.manual_seed(0)
    peer = vqp.ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, decay=0.99,
                          commitment_weight=0.25, kmeans_init=False, use_cosine_sim=cosine)
    ours = vqfast.ResidualVQ(3, 16, 8, cosine=cosine, backend="torch", **ORIGINAL)
    for level, layer in enumerate(peer.layers):
        _copy_peer_codebook(ours, level, layer._codebook)
    x = torch.randn(2, 8, 30)
    q_peer, idx_peer, losses_peer = peer(x.transpose(1, 2))
    loss, q, _, codes = ours(x)
    assert torch.equal(codes.movedim(1, -1), idx_peer)
    torch.testing.assert_close(q.transpose(1, 2), q_peer, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, losses_peer.sum().detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.codebooks, _peer_codebooks(peer.layers), rtol=1e-4, atol=1e-5)


def test_cross_check_grouped_vector_quantize_pytorch():
    """The peer's GroupedResidualVQ (channels split in G chunks, a ResidualVQ each), one
    training step: the same codes (ours group-major ``[B, G*Q, T]``, its ``[G, B, T, Q]``),
    output, loss and EMA codebooks."""
    vqp = _peer()
    torch.manual_seed(0)
    groups, levels = 2, 3
    peer = vqp.GroupedResidualVQ(dim=10, groups=groups, num_quantizers=levels, codebook_size=16,
                                 decay=0.99, commitment_weight=0.25, kmeans_init=False)
    ours = vqfast.ResidualVQ(levels, 16, 10, groups=groups, backend="torch", **ORIGINAL)
    for g, rvq in enumerate(peer.rvqs):
        for level, layer in enumerate(rvq.layers):
            _copy_peer_codebook(ours, g * levels + level, layer._codebook)
    x = torch.randn(2, 10, 17)
    q_peer, idx_peer, losses_peer = peer(x.transpose(1, 2))
    loss, q, _, codes = ours(x)
    assert torch.equal(codes.view(2, groups, levels, 17).permute(1, 0, 3, 2), idx_peer)
    torch.testing.assert_close(q.transpose(1, 2), q_peer, rtol=1e-5, atol=1e-5)
    # Each group's mse is over its own D/G channels there, over all D here: G times less.
    torch.testing.assert_close(loss, losses_peer.sum().detach() / groups, rtol=1e-5, atol=1e-7)
    books = torch.cat([_peer_codebooks(rvq.layers) for rvq in peer.rvqs])
    torch.testing.assert_close(ours.codebooks, books, rtol=1e-4, atol=1e-5)


def test_cross_check_cosine_factorized_vector_quantize_pytorch():
    """The tokenizer's quantizer, one training step: the peer's ``VectorQuantize(
    use_cosine_sim=True, codebook_dim=d)`` and ``VectorQuantizerEMA(cosine=True,
    codebook_dim=d)`` with the same projections and codes choose the same codes and give
    the same output, commitment loss and EMA codebook."""
    vqp = _peer()
    torch.manual_seed(0)
    peer = vqp.VectorQuantize(dim=24, codebook_size=32, codebook_dim=4, use_cosine_sim=True,
                              decay=0.99, commitment_weight=0.25, kmeans_init=False)
    ours = vqfast.VectorQuantizerEMA(32, 24, 0.25, cosine=True, codebook_dim=4, backend="torch", **ORIGINAL)
    linear_in = next(m for m in peer.project_in.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        ours.codebook.copy_(peer._codebook.embed[0])
        ours.ema_weight.copy_(peer._codebook.embed_avg[0])
        ours.ema_cluster_size.copy_(peer._codebook.cluster_size[0])
        for mine, theirs in ((ours.project_in, linear_in), (ours.project_out, peer.project_out)):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
    x = torch.randn(2, 24, 5, 3)
    q_peer, idx_peer, loss_peer = peer(x.flatten(2).transpose(1, 2))
    loss, q, _, codes = ours(x)
    assert torch.equal(codes.flatten(1), idx_peer)
    torch.testing.assert_close(q.flatten(2).transpose(1, 2), q_peer, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_peer.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.codebook, peer._codebook.embed[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ["shared", "cosine", "all"])
def test_deterministic_mode_matches_oracle(option, backend):
    """Sorted (atomic-free) sums of the EMA statistics and codebook gradients."""
    torch.use_deterministic_algorithms(True)
    try:
        for ema in (True, False):
            test_functional_matches_oracle(SHAPES[1], option, ema, backend)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_inputs(dtype, backend):
    """16-bit inputs: the search runs in x's dtype; the output is the sum of the fp32 codes
    it chose (rounded once), the loss their exact error, the codes nearest at level 0."""
    from _util import assert_nearest
    rvq = vqfast.ResidualVQ(3, 17, 8, backend=backend, **ORIGINAL).to(DEVICE).eval()
    z = torch.randn(2, 8, 13, device=DEVICE).to(dtype)
    loss, q, _, codes = rvq(z)
    assert q.dtype == dtype and loss.dtype == torch.float32
    assert_nearest(_flat(z).float(), rvq.codebooks[0], codes[:, 0].reshape(-1), dtype)
    ulp = 2**-7 if dtype == torch.bfloat16 else 0.0  # (the interpreter's bf16 rounds toward 0)
    torch.testing.assert_close(q, rvq.decode_indices(codes).to(dtype), rtol=ulp, atol=0)
    x = _flat(z).float()
    sq = 0.0
    for level in range(3):
        code = rvq.codebooks[level][codes[:, level].reshape(-1)]
        sq = sq + (code - x).pow(2).sum()
        x = x - code
    torch.testing.assert_close(loss, 0.25 * sq / z.numel(), rtol=1e-5, atol=1e-6)


RVQ_OPTIONS = {
    "ema": dict(),
    "learned+cosine+rotation": dict(ema=False, cosine=True, rotation_trick=True),
    "groups+shared+dropout": dict(groups=2, shared_codebook=True, quantize_dropout=True),
    "ema+kmeans+dead+codebook_dim": dict(kmeans_init=True, dead_code_threshold=1.0,
                                         codebook_dim=3),
    "ema+all+sync": dict(groups=2, quantize_dropout=True, cosine=True, kmeans_init=True,
                         dead_code_threshold=1.0, sync_distributed=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", RVQ_OPTIONS)
def test_training_step_reads_nothing_on_the_host(option, backend, request):
    kw = RVQ_OPTIONS[option]
    if kw.get("sync_distributed"):
        request.getfixturevalue("single_rank_group")
    rvq = vqfast.ResidualVQ(3, 19, 6, backend=backend, **{**ORIGINAL, **kw}).to(DEVICE)
    mask = torch.rand(3, 4, 3, device=DEVICE) > 0.2

    def step():
        z = torch.randn(3, 6, 4, 3, device=DEVICE, requires_grad=True)
        loss, q, perplexity, _ = rvq(z, mask=mask)
        (loss + q.pow(2).mean()).backward()
        return z, perplexity

    step()  # k-means: once
    with HostReads() as recorder:
        z, perplexity = step()
    assert recorder.found == [], recorder.found
    assert bool(torch.isfinite(z.grad).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", [o for o in RVQ_OPTIONS if "sync" not in o])
def test_compiles_fullgraph_and_matches_eager(option, backend):
    torch._dynamo.reset()
    kw = RVQ_OPTIONS[option]
    eager = vqfast.ResidualVQ(3, 19, 6, backend=backend, **{**ORIGINAL, **kw}).to(DEVICE)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    for step in range(3):
        z = torch.randn(3, 6, 4, 3, device=DEVICE)
        mask = torch.rand(3, 4, 3, device=DEVICE) > 0.2
        seed = 100 + step
        results = []
        for module in (eager, compiled):
            torch.manual_seed(seed)  # the same dropout draw and re-seeding picks
            zz = z.clone().requires_grad_()
            loss, q, perplexity, codes = module(zz, mask=mask)
            (loss + q.pow(2).sum()).backward()
            results.append((loss, q, perplexity, codes, zz.grad))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for key, value in tensor_state(eager).items():
        torch.testing.assert_close(twin.state_dict()[key], value, rtol=1e-5, atol=1e-5)


def test_distributed_statistics_are_one_packed_all_reduce(single_rank_group, monkeypatch):
    """Every level's counts and sums travel in one collective per step."""
    import torch.distributed as dist
    calls = []
    original = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (calls.append(t.numel()),
                                                                original(t, *a, **k))[1])
    rvq = vqfast.ResidualVQ(4, 11, 6, groups=2, backend="torch", **ORIGINAL)
    rvq(torch.randn(2, 6, 5))
    assert calls == [2 * 4 * 11 * 3 + 2 * 4 * 11 + 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    ops = torch.ops.vqfast
    x = torch.randn(2, 6, 7, device=DEVICE)
    books = torch.randn(4, 9, 3, device=DEVICE)
    mask = torch.rand(14, device=DEVICE) > 0.3
    active = torch.tensor(1, device=DEVICE)
    q, idx, *_ = ops.residual_quantize(x, books, 2, 2, False, None, None, True, backend, "ieee")
    for args in [(x, books, 2, 2, False, None, None, True, backend, "ieee"),
                 (x, books, 2, 2, True, active, mask, False, backend, "ieee")]:
        torch.library.opcheck(ops.residual_quantize.default, args)
    torch.library.opcheck(ops.residual_backward.default,
                          (torch.randn_like(x), torch.tensor(0.3, device=DEVICE), x, books, idx,
                           2, 2, True, True, 0.1, 0.2, backend))


# --- the same options on the single-codebook quantizers ---------------------------------

SINGLE_OPTIONS = {"cosine": dict(cosine=True), "rotation": dict(rotation_trick=True),
                  "mask": {}, "cosine+rotation+mask": dict(cosine=True, rotation_trick=True)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["plain", "ema"])
@pytest.mark.parametrize("option", SINGLE_OPTIONS)
def test_single_quantizer_options_match_oracle(option, kind, backend):
    """VectorQuantizer / VectorQuantizerEMA with cosine codes, the rotation trick or a mask:
    the oracle with one level of one group, three training steps."""
    kw = SINGLE_OPTIONS[option]
    cls = vqfast.VectorQuantizerEMA if kind == "ema" else vqfast.VectorQuantizer
    vq = cls(11, 7, 0.25, backend=backend, **{**ORIGINAL, **kw}).to(DEVICE)
    if kind == "plain":
        with torch.no_grad():
            vq.codebook.normal_()
    for _ in range(3):
        z = torch.randn(2, 7, 5, 3, device=DEVICE)
        mask = (torch.rand(2, 5, 3, device=DEVICE) > 0.3) if "mask" in option else None
        codebook = vq.codebook.detach().clone().requires_grad_()
        used = F.normalize(codebook, dim=-1) if kw.get("cosine") and kind == "plain" else codebook
        x_ref = _flat(z).clone().requires_grad_()
        out_r, loss_r, idx_r, _, counts_r, sums_r = reference.residual_vq(
            x_ref, used[None], 1, cosine=kw.get("cosine", False), ema=kind == "ema",
            mask=mask.reshape(-1) if mask is not None else None,
            rotation_trick=kw.get("rotation_trick", False))
        zz = z.clone().requires_grad_()
        state = [t.clone() for t in (vq.ema_cluster_size, vq.ema_weight)] if kind == "ema" else None
        loss, q, perplexity, codes = vq(zz, mask=mask)
        assert torch.equal(codes.reshape(-1), idx_r[0])
        torch.testing.assert_close(_flat(q), out_r.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-6)
        weight = torch.randn_like(q)
        (loss + (q * weight).sum()).backward()
        (loss_r + (out_r * _flat(weight)).sum()).backward()
        torch.testing.assert_close(_flat(zz.grad), x_ref.grad, rtol=1e-4, atol=1e-5)
        if kind == "plain":
            torch.testing.assert_close(vq.codebook.grad, codebook.grad, rtol=1e-4, atol=1e-5)
            vq.codebook.grad = None
        else:
            size, w, book = reference.ema_step(state[0], state[1], counts_r[0].float(), sums_r[0],
                                               0.99, 1e-5, cosine=kw.get("cosine", False))
            torch.testing.assert_close(vq.ema_cluster_size, size, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(vq.codebook, book, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [vqfast.VectorQuantizer, vqfast.VectorQuantizerEMA])
def test_single_quantizer_codebook_dim(cls):
    vq = cls(9, 12, 0.25, codebook_dim=3, kmeans_init=True, backend="torch")
    z = torch.randn(2, 12, 4, 4, requires_grad=True)
    loss, q, _, codes = vq(z, mask=torch.rand(2, 4, 4) > 0.2)
    assert vq.codebook.shape == (9, 3) and q.shape == z.shape and codes.shape == (2, 4, 4)
    (loss + q.square().sum()).backward()
    assert vq.project_in.weight.grad is not None and vq.project_out.weight.grad is not None


PADDING_ONLY = {
    "rvq": lambda b: vqfast.ResidualVQ(3, 8, 6, groups=2, backend=b, **ORIGINAL),
    "rvq+shared+dropout+dead": lambda b: vqfast.ResidualVQ(
        3, 8, 6, shared_codebook=True, quantize_dropout=True, dead_code_threshold=1.0, backend=b),
    "rvq+kmeans+cosine": lambda b: vqfast.ResidualVQ(2, 8, 6, kmeans_init=True, cosine=True,
                                                     backend=b),
    "ema+dead": lambda b: vqfast.VectorQuantizerEMA(8, 6, 0.25, dead_code_threshold=1.0, backend=b),
    "ema+kmeans": lambda b: vqfast.VectorQuantizerEMA(8, 6, 0.25, kmeans_init=True, backend=b),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", PADDING_ONLY)
def test_padding_only_batch_leaves_state(kind, backend):
    """A training batch whose mask is all False (padding only) changes no state: no EMA
    step (from the zero state it would divide by zero), no k-means init (it waits for real
    rows); the next batch with real rows trains as usual."""
    module = PADDING_ONLY[kind](backend).to(DEVICE)
    before = copy.deepcopy(module.state_dict())
    z = torch.randn(2, 6, 5, device=DEVICE, requires_grad=True)
    loss, q, perplexity, codes = module(z, mask=torch.zeros(2, 5, dtype=torch.bool, device=DEVICE))
    (loss + q.sum()).backward()
    for key, value in tensor_state(module).items():
        assert torch.equal(value, before[key]), key
    assert float(loss.detach()) == 0.0 and bool((codes == -1).all()) and torch.equal(q, z)
    assert bool((perplexity == 1).all())
    module(torch.randn(2, 6, 5, device=DEVICE), mask=torch.rand(2, 5, device=DEVICE) > 0.3)
    state = tensor_state(module)
    assert all(bool(torch.isfinite(v.float()).all()) for v in state.values())
    assert not torch.equal(state["ema_cluster_size"], before["ema_cluster_size"])
    if "initialized" in state:
        assert bool(state["initialized"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ema", [True, False], ids=["ema", "learned"])
def test_per_level_codebook_sizes_match_the_oracle(ema, backend):
    """num_embeddings=(11, 7, 5): three training steps against the oracle with codebooks
    of those sizes (outputs, codes, loss, gradients; EMA state per codebook), padding rows
    untouched and never chosen."""
    sizes, groups, levels, d = (11, 7, 5), 2, 3, 8
    rvq = vqfast.ResidualVQ(levels, sizes, d, groups=groups, ema=ema, backend=backend,
                            **ORIGINAL).to(DEVICE)
    assert rvq.codebooks.shape == (groups * levels, 11, d // groups)
    book_k = [sizes[b % levels] for b in range(groups * levels)]
    books = [rvq.codebooks.detach()[b, :k].double().clone() for b, k in enumerate(book_k)]
    size = [rvq.ema_cluster_size[b, :k].double().clone() for b, k in enumerate(book_k)] if ema else None
    weight = [rvq.ema_weight[b, :k].double().clone() for b, k in enumerate(book_k)] if ema else None
    for step in range(3):
        z = torch.randn(2, d, 7, 5, device=DEVICE)
        mask = torch.rand(2, 7, 5, device=DEVICE) > 0.3 if step == 2 else None
        x = z.clone().requires_grad_()
        loss, q, _, codes = rvq(x, mask=mask)
        ref_books = [b.clone().requires_grad_() for b in books]
        x_ref = _flat(z).double().requires_grad_()
        out_r, loss_r, idx_r, _, counts_r, sums_r = reference.residual_vq(
            x_ref, ref_books, levels, groups=groups, ema=ema,
            mask=mask.reshape(-1) if mask is not None else None)
        assert torch.equal(codes.movedim(1, 0).reshape(groups * levels, -1), idx_r)
        torch.testing.assert_close(_flat(q), out_r.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss.double(), loss_r, rtol=1e-5, atol=1e-6)
        weight_q = torch.randn_like(q)
        (loss + (q * weight_q).sum()).backward()
        (loss_r + (out_r * _flat(weight_q).double()).sum()).backward()
        torch.testing.assert_close(_flat(x.grad).double(), x_ref.grad, rtol=1e-4, atol=1e-5)
        if ema:
            for b, k in enumerate(book_k):
                size[b], weight[b], books[b] = reference.ema_step(
                    size[b], weight[b], counts_r[b, :k].double(), sums_r[b, :k], 0.99, 1e-5)
                torch.testing.assert_close(rvq.ema_cluster_size[b, :k].double(), size[b],
                                           rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(rvq.codebooks[b, :k].double(), books[b],
                                           rtol=1e-4, atol=1e-5)
                assert float(rvq.ema_cluster_size[b, k:].abs().sum()) == 0  # padding untouched
        else:
            for b, k in enumerate(book_k):
                torch.testing.assert_close(rvq.codebooks.grad[b, :k].double(), ref_books[b].grad,
                                           rtol=1e-4, atol=1e-5)
                assert float(rvq.codebooks.grad[b, k:].abs().sum()) == 0
            with torch.no_grad():
                rvq.codebooks -= 0.1 * rvq.codebooks.grad
                books = [rvq.codebooks.detach()[b, :k].double().clone() for b, k in enumerate(book_k)]
            rvq.codebooks.grad = None
    assert float(rvq.codebooks.detach()[~rvq.real_codes].abs().sum()) == 0
    rvq.eval()
    z = torch.randn(2, d, 7, 5, device=DEVICE)
    codes = rvq.encode(z)
    torch.testing.assert_close(rvq.decode_indices(codes), rvq(z)[1].float(), rtol=1e-5, atol=1e-5)
    bad = codes.clone()
    bad[:, 2] = 6  # level 2 has 5 codes
    with pytest.raises(ValueError, match="level 2"):
        rvq.decode_indices(bad)


def test_per_level_sizes_with_kmeans_dead_codes_and_usage():
    rvq = vqfast.ResidualVQ(2, (16, 6), 4, backend="torch", dead_code_threshold=2.0)
    for step in range(6):
        rvq(torch.randn(3, 4, 50) + step)
    assert bool(rvq.initialized)
    assert float(rvq.codebooks[~rvq.real_codes].abs().sum()) == 0  # padding never re-seeded
    usage = rvq.codebook_usage()
    assert [u.usage.shape[0] for u in usage] == [16, 6]
    with pytest.raises(ValueError, match="one int >= 1 per level"):
        vqfast.ResidualVQ(2, (16, 6, 3), 4)
    with pytest.raises(ValueError, match="one size"):
        vqfast.ResidualVQ(2, (16, 6), 4, shared_codebook=True)
    with pytest.raises(ValueError, match="num_embeddings"):  # the state says which sizes
        vqfast.ResidualVQ(2, 16, 4).load_state_dict(rvq.state_dict())


@pytest.mark.parametrize("finite", [True, False])
def test_cpu_shortcuts_give_the_device_rule_bit_for_bit(finite, monkeypatch):
    """The torch path's CPU shortcuts (``vqfast._torch.CPU_SHORTCUTS``: the EMA update of
    only the codebooks a batch used, in place; no copy of codebooks that are all finite)
    leave the state the branch-free rule (a CUDA device's) leaves, bit for bit: with a
    codebook the batch did not use (its statistics unwritten, here NaN), with a non-finite
    batch, and in a ResidualVQ training step on its first levels only."""
    from vqfast import _torch
    gen = torch.Generator().manual_seed(0)
    c, k, d = 4, 7, 5
    state = [torch.rand(c, k, generator=gen), torch.randn(c, k, d, generator=gen),
             torch.randn(c, k, d, generator=gen), torch.rand(c, generator=gen),
             torch.zeros(c, dtype=torch.int64)]
    counts = torch.randint(0, 5, (c, k), generator=gen).int()
    sums = torch.randn(c, k, d, generator=gen)
    sums[2] = float("nan")  # a codebook the batch did not use
    active = torch.tensor([True, True, False, True])
    loss = torch.tensor(1.0 if finite else float("nan"))
    results = []
    for shortcuts in (True, False):
        monkeypatch.setattr(_torch, "CPU_SHORTCUTS", shortcuts)
        mine = [t.clone() for t in state]
        applied = _torch.ema_update(counts, sums, loss, None, *mine, 0.9, 1e-5, active,
                                    size_rule=1)
        results.append((applied, mine))
    for a, b in zip(results[0][1] + [results[0][0]], results[1][1] + [results[1][0]]):
        assert torch.equal(a, b)
    assert torch.equal(results[0][1][1][2], state[1][2])  # the unused codebook: untouched

    steps = []
    for shortcuts in (True, False):
        monkeypatch.setattr(_torch, "CPU_SHORTCUTS", shortcuts)
        torch.manual_seed(0)
        rvq = vqfast.ResidualVQ(5, 9, 6, kmeans_init=False, backend="torch")
        z = torch.randn(2, 6, 7, requires_grad=True)
        loss, q, _, codes = rvq(z, num_levels=2)
        (loss + q.square().mean()).backward()
        steps.append((loss, q, codes, z.grad, *tensor_state(rvq).values()))
    for a, b in zip(*steps):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("groups,levels,shared,cosine,real", [
    (1, 3, False, False, False), (2, 3, False, True, False), (2, 2, True, False, False),
    (1, 4, False, False, True)])
def test_residual_reseed_launch_follows_the_rule(groups, levels, shared, cosine, real, dtype):
    """ResidualVQ's dead-code re-seeding in one launch: each dead code of an applied
    codebook takes its row as its level saw it (the input minus the earlier levels' codes,
    written out here), at the start size; both backends alike."""
    from vqfast import _torch, kernels
    torch.manual_seed(3)
    b, s, k, d = 2, 7, 11, 5
    n, books = b * s, groups * (1 if shared else levels)
    z = torch.randn(b, groups * d, s, device=DEVICE).to(dtype)
    idx = torch.randint(-1, k, (groups * levels, n), device=DEVICE)
    snapshot = torch.randn(books, k, d, device=DEVICE)
    picks = torch.randint(0, n, (k,), device=DEVICE)
    decay_weight = torch.rand(books, device=DEVICE) + 0.5
    size = torch.rand(books, k, device=DEVICE) * 2
    applied = torch.ones(books, device=DEVICE)
    applied[-1] = 0.0 if books > 1 else 1.0
    real_codes = torch.rand(books, k, device=DEVICE) > 0.3 if real else None
    state = [torch.randn(books, k, d, device=DEVICE), torch.randn(books, k, d, device=DEVICE)]
    results = {}
    for name, impl in (("torch", _torch.residual_reseed), ("triton", kernels.residual_reseed)):
        if name == "triton" and "triton" not in BACKENDS:
            continue
        out = [size.clone(), state[0].clone(), state[1].clone(),
               torch.zeros(books, dtype=torch.int64, device=DEVICE)]
        impl(z, idx, snapshot, picks, out[0], decay_weight, applied, out[1], out[2], out[3],
             real_codes, 1.0, groups, levels, shared, cosine)
        results[name] = out
    new_size, new_book, new_weight, reseeded = results["torch"]
    dead = (size / decay_weight[:, None] < 1.0) & (applied[:, None] > 0)
    rows = z.float().movedim(1, -1).reshape(n, groups, d)
    for book in range(books):
        g, level = (book, 0) if shared else divmod(book, levels)
        for code in range(k):
            row = int(picks[code])
            chosen = int(idx[g * levels + level, row])
            is_dead = bool(dead[book, code]) and chosen >= 0 and (real_codes is None or
                                                                  bool(real_codes[book, code]))
            if not is_dead:
                assert torch.equal(new_book[book, code], state[0][book, code])
                continue
            expected = rows[row, g].clone()
            for earlier in range(level):
                c = int(idx[g * levels + earlier, row])
                if c >= 0:
                    expected -= snapshot[g * levels + earlier, c]
            if cosine:
                expected = expected / expected.norm().clamp_min(1e-12)
            torch.testing.assert_close(new_book[book, code], expected)
            torch.testing.assert_close(new_size[book, code], decay_weight[book])
            torch.testing.assert_close(new_weight[book, code], expected * decay_weight[book])
    assert int(reseeded.sum()) > 0 and int(reseeded[-1]) == (0 if books > 1 else reseeded[-1])
    if "triton" in results:
        for got, want in zip(results["triton"], results["torch"]):
            torch.testing.assert_close(got, want)
