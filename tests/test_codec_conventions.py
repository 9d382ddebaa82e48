"""``ResidualVQ`` with a codec's conventions reproduces the codec's own quantizer, built
from its package: facebook's encodec (``ema_size="raw"``: the cluster sizes stored
unsmoothed; ``commitment_levels="first"``: only the first level's commitment reaches the
input) and kyutai's moshi (``ema_size="raw_clamped"``: unsmoothed, divided by
``max(size, epsilon)``; every level's commitment reaches the input). The codec's state
is copied into vqfast, both train side by side from the same inputs, and every step's
codes, output, loss and input gradient, then the EMA state, must agree to fp32 rounding,
on both backends. Without the codec's options they must not: each option is what makes
the difference."""

import pytest
import torch

import vqfast
from benchmarks.patched import third_party

Q, K, D, DECAY, EPS = 3, 32, 12, 0.9, 1e-5


def _encodec_rvq():
    core_vq = third_party("encodec.quantization.core_vq")
    if core_vq is None:
        pytest.skip("encodec is not installed")
    torch.manual_seed(0)
    return core_vq.ResidualVectorQuantization(
        num_quantizers=Q, dim=D, codebook_size=K, decay=DECAY, epsilon=EPS, kmeans_init=False,
        threshold_ema_dead_code=0, commitment_weight=1.0).train()


def _moshi_rvq():
    core_vq = third_party("moshi.quantization.core_vq")
    if core_vq is None:
        pytest.skip("moshi is not installed")
    torch.manual_seed(0)
    rvq = core_vq.ResidualVectorQuantization(
        num_quantizers=Q, codebook_offset=0, dim=D, codebook_size=K, decay=DECAY,
        epsilon=EPS, threshold_usage_ratio=0.0).train()
    for layer in rvq.layers:  # trained codebooks (no k-means: moshi's draws its own rows)
        book = layer._codebook
        book.embedding_sum.normal_()
        book.cluster_usage.uniform_(0.5, 2.0)
        book._initialized.fill_(1)
    return rvq


def _their_state(theirs):
    books = [layer._codebook for layer in theirs.layers]
    if hasattr(books[0], "embed_avg"):  # encodec
        return {"codebooks": torch.stack([b.embed for b in books]),
                "ema_weight": torch.stack([b.embed_avg for b in books]),
                "ema_cluster_size": torch.stack([b.cluster_size for b in books])}
    return {"codebooks": torch.stack([b.embedding for b in books]),  # moshi
            "ema_weight": torch.stack([b.embedding_sum for b in books]),
            "ema_cluster_size": torch.stack([b.cluster_usage for b in books])}


CODECS = {  # its quantizer, and the ResidualVQ options that reproduce it
    "encodec": (_encodec_rvq, dict(ema_size="raw", commitment_levels="first")),
    "moshi": (_moshi_rvq, dict(ema_size="raw_clamped", commitment_levels="all")),
}


def _vqfast_like(theirs, backend, **conventions):
    ours = vqfast.ResidualVQ(Q, K, D, commitment_cost=1.0, decay=DECAY, epsilon=EPS,
                             kmeans_init=False, dead_code_threshold=0, backend=backend,
                             **conventions).train()
    with torch.no_grad():
        for name, value in _their_state(theirs).items():
            getattr(ours, name).copy_(value)
    return ours


def _train_side_by_side(theirs, ours, steps):
    for step in range(steps):
        x = torch.randn(2, D, 40, generator=torch.Generator().manual_seed(step))
        grad = torch.randn(2, D, 40, generator=torch.Generator().manual_seed(100 + step))
        x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        q_theirs, codes_theirs, losses = theirs(x_theirs)[:3]
        loss_ours, q_ours, _, codes_ours = ours(x_ours)
        assert torch.equal(codes_ours.transpose(0, 1), codes_theirs), f"step {step}: codes"
        torch.testing.assert_close(q_ours, q_theirs, msg=f"step {step}: output")
        torch.testing.assert_close(loss_ours, losses.sum(), msg=f"step {step}: loss")
        torch.autograd.backward((q_theirs, losses.sum()), (grad, torch.ones(())))
        torch.autograd.backward((q_ours, loss_ours), (grad, torch.ones(())))
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, msg=f"step {step}: input grad")
    for name, value in _their_state(theirs).items():
        torch.testing.assert_close(getattr(ours, name), value, rtol=1e-5, atol=1e-6,
                                   msg=f"{name} after {steps} steps")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("codec", list(CODECS))
def test_residual_vq_reproduces_the_codec(codec, backend):
    build, conventions = CODECS[codec]
    theirs = build()
    ours = _vqfast_like(theirs, backend, **conventions)
    _train_side_by_side(theirs, ours, steps=20 if backend == "torch" else 4)


@pytest.mark.parametrize("codec,conventions,differs", [
    ("encodec", dict(commitment_levels="first"), "output|codes|ema_"),  # smoothed sizes
    ("encodec", dict(ema_size="raw"), "step 0: input grad"),  # every level's commitment
    ("moshi", dict(ema_size="raw"), "output|codes|ema_"),  # Laplace smoothing
    ("moshi", dict(ema_size="raw_clamped", commitment_levels="first"), "step 0: input grad"),
])
def test_each_convention_is_needed(codec, conventions, differs):
    """Without the codec's own option the run parts from the codec's: the check fails."""
    theirs = CODECS[codec][0]()
    ours = _vqfast_like(theirs, "torch", **conventions)
    with pytest.raises(AssertionError, match=differs):
        _train_side_by_side(theirs, ours, steps=20)


def test_bad_conventions_are_refused():
    with pytest.raises(ValueError, match="ema_size"):
        vqfast.ResidualVQ(2, 8, 4, ema_size="unsmoothed")
    with pytest.raises(ValueError, match="commitment_levels"):
        vqfast.ResidualVQ(2, 8, 4, commitment_levels=1)


def test_a_checkpoint_with_raw_sizes_loads_only_where_they_mean_the_same():
    """The stored sizes mean something else under ``ema_size="raw"``: such a checkpoint is
    refused by a default module, with the option named; default checkpoints (and those of
    earlier versions) load as before."""
    raw = vqfast.ResidualVQ(2, 8, 4, ema_size="raw", commitment_levels="first")
    assert "ema_size='raw'" in repr(raw) and "commitment_levels='first'" in repr(raw)
    with pytest.raises(ValueError, match="ema_size='raw'"):
        vqfast.ResidualVQ(2, 8, 4).load_state_dict(raw.state_dict())
    vqfast.ResidualVQ(2, 8, 4, ema_size="raw").load_state_dict(raw.state_dict())
    default = vqfast.ResidualVQ(2, 8, 4).state_dict()
    vqfast.ResidualVQ(2, 8, 4, commitment_levels="first").load_state_dict(default)
