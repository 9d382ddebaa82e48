"""The defaults train without collapsing the codebook (k-means init + dead-code re-seeding,
also for the learned codebook); the original algorithm stays one argument away."""

import pytest
import torch

import vqfast
from _util import ORIGINAL, BACKENDS, DEVICE, tensor_state


def _far_clusters(k=16, d=6, n=512, seed=0):
    """Rows in tight clusters far from any initial code: the original algorithm's setting
    for collapse (every vector picks the one code nearest to the data's side)."""
    g = torch.Generator().manual_seed(seed)
    centers = 5 + 2 * torch.randn(k, d, generator=g)

    def batch():
        labels = torch.randint(k, (n,), generator=g)
        return (centers[labels] + 0.05 * torch.randn(n, d, generator=g)).T.reshape(1, d, n)
    return batch


def test_defaults_are_kmeans_init_and_dead_code_reseeding():
    for vq, threshold in ((vqfast.VectorQuantizer(8, 4), 1.0), (vqfast.VectorQuantizerEMA(8, 4), 0.5),
                          (vqfast.ResidualVQ(2, 8, 4), 1.0), (vqfast.VQVAE(8, 1, 4, 8, 4).vq, 1.0),
                          (vqfast.VQVAE(8, 1, 4, 8, 4, decay=0.99).vq, 0.5)):
        assert vq.kmeans_init and vq.dead_code_threshold == threshold, type(vq).__name__
    learned = vqfast.ResidualVQ(2, 8, 4, ema=False)
    assert learned.kmeans_init and learned.dead_code_threshold == 0.0
    original = vqfast.VectorQuantizerEMA(8, 4, **vqfast.ORIGINAL_ALGORITHM)
    assert not original.kmeans_init and original.dead_code_threshold == 0.0
    with pytest.raises(TypeError):
        vqfast.ORIGINAL_ALGORITHM["kmeans_init"] = True  # read-only


@pytest.mark.parametrize("kind", ["plain", "ema", "residual"])
def test_defaults_use_the_codebook_where_the_original_algorithm_collapses(kind):
    make = {"plain": lambda **kw: vqfast.VectorQuantizer(16, 6, backend="torch", **kw),
            "ema": lambda **kw: vqfast.VectorQuantizerEMA(16, 6, backend="torch", **kw),
            "residual": lambda **kw: vqfast.ResidualVQ(2, 16, 6, backend="torch", **kw)}[kind]
    used = {}
    for name, options in (("defaults", {}), ("original", ORIGINAL)):
        torch.manual_seed(0)
        vq = make(**options)
        opt = torch.optim.Adam(vq.parameters(), lr=1e-2) if list(vq.parameters()) else None
        batch = _far_clusters()
        for _ in range(40):
            loss, _, _, _ = vq(batch())
            if opt is not None:
                loss.backward()
                opt.step()
                opt.zero_grad()
        vq.eval()
        codes = vq.encode(batch())
        used[name] = int((codes[:, 0] if kind == "residual" else codes).unique().numel())
    assert used["original"] <= 4, used  # collapsed onto a few codes
    assert used["defaults"] >= 12, used  # most of the 16 clusters have a code


@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_codebook_reseeds_dead_codes_from_batch_rows_before_its_lookup(backend):
    torch.manual_seed(0)
    vq = vqfast.VectorQuantizer(12, 5, kmeans_init=False, backend=backend).to(DEVICE)
    opt = torch.optim.SGD(vq.parameters(), lr=0.1)
    z = torch.randn(2, 5, 7, device=DEVICE) + 4.0  # far from the uniform(-1/K, 1/K) init
    loss, q, _, codes = vq(z)  # step 1 measures usage (one code takes every row)
    loss.backward()
    opt.step()
    opt.zero_grad()
    assert int(vq.reseeded_codes) == 0 and int((vq.ema_cluster_size > 0).sum()) == 1
    before = vq.codebook.detach().clone()
    z2 = torch.randn(2, 5, 7, device=DEVICE) + 4.0
    z2.requires_grad_()
    loss, q, _, codes = vq(z2)
    reseeded = int(vq.reseeded_codes)
    assert reseeded == 11  # every code but the used one
    rows = z2.detach().movedim(1, -1).reshape(-1, 5)
    changed = (vq.codebook.detach() != before).any(1)
    for code in vq.codebook.detach()[changed]:  # each new code is a row of this batch
        assert (rows == code).all(1).any()
    # ... and this step's lookup already sees them: each row's code is its nearest new code
    assert codes.unique().numel() > 1
    torch.testing.assert_close(q.detach(), vq.codebook.detach()[codes].movedim(-1, 1))
    (loss + q.sum()).backward()  # the parameter changed before the op saved it
    assert torch.isfinite(z2.grad).all() and torch.isfinite(vq.codebook.grad).all()


def test_learned_codebook_reseeding_skips_masked_rows_and_frozen_codebooks():
    torch.manual_seed(0)
    vq = vqfast.VectorQuantizer(12, 5, kmeans_init=False, backend="torch")
    z = torch.randn(2, 5, 7) + 4.0
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, :3] = True
    z[~mask.unsqueeze(1).expand_as(z)] = 1e6  # padding: must never become a code
    for _ in range(3):
        vq(z, mask=mask)
    assert int(vq.reseeded_codes) > 0
    assert float(vq.codebook.detach().abs().max()) < 1e3
    frozen = vqfast.VectorQuantizer(12, 5, kmeans_init=False, backend="torch",
                                    freeze_codebook=True)
    state = {k: v.clone() for k, v in tensor_state(frozen).items()}
    for _ in range(3):
        frozen(torch.randn(2, 5, 7) + 4.0)
    for key, value in tensor_state(frozen).items():
        assert torch.equal(value, state[key]), key


def test_learned_codebook_usage_state_loads_casts_and_reports():
    legacy = {"_embedding.weight": torch.randn(12, 5)}  # the notebook's plain quantizer
    vq = vqfast.VectorQuantizer(12, 5)
    vq.load_state_dict(legacy)
    assert vq._kmeans_done and torch.equal(vq.codebook.detach(), legacy["_embedding.weight"])
    assert torch.equal(vq.ema_cluster_size, torch.ones(12)) and float(vq.ema_decay_weight) == 1
    half = vqfast.VectorQuantizer(12, 5).half()
    assert half.codebook.dtype == torch.float16 and half.ema_cluster_size.dtype == torch.float32
    usage = vq.codebook_usage()
    assert usage.alive_codes == 12 and usage.dead_codes == 0
    again = vqfast.VectorQuantizer(12, 5)
    again.load_state_dict(vq.state_dict())
    for key, value in tensor_state(vq).items():
        assert torch.equal(again.state_dict()[key], value), key
