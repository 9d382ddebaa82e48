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
from benchmarks.codecs import dac_like, ema_like, ema_state, mimi_like
from benchmarks.patched import third_party

Q, K, D, DECAY, EPS = 3, 32, 12, 0.9, 1e-5


pytestmark = pytest.mark.kernels


def _encodec_rvq():
    core_vq = third_party("encodec.quantization.core_vq")
    if core_vq is None:
        pytest.skip("encodec is not installed")
    torch.manual_seed(0)
    # encodec's default expiry (threshold 2) re-seeds `embed` only, which its EMA update
    # then overwrites: the same quantizer as vqfast's dead_code_threshold=0
    return core_vq.ResidualVectorQuantization(
        num_quantizers=Q, dim=D, codebook_size=K, decay=DECAY, epsilon=EPS, kmeans_init=False,
        threshold_ema_dead_code=2, commitment_weight=1.0).train()


def _moshi_rvq(threshold_usage_ratio=0.0, rare_codes=False):
    core_vq = third_party("moshi.quantization.core_vq")
    if core_vq is None:
        pytest.skip("moshi is not installed")
    torch.manual_seed(0)
    rvq = core_vq.ResidualVectorQuantization(
        num_quantizers=Q, codebook_offset=0, dim=D, codebook_size=K, decay=DECAY,
        epsilon=EPS, threshold_usage_ratio=threshold_usage_ratio).train()
    for layer in rvq.layers:  # trained codebooks (no k-means: moshi's draws its own rows)
        book = layer._codebook
        book.embedding_sum.normal_()
        book.cluster_usage.uniform_(0.5, 2.0)
        if rare_codes:  # rarely used codes, to expire
            book.cluster_usage[::3] = 0.01
        book._initialized.fill_(1)
    return rvq


CODECS = {  # its quantizer, and the ResidualVQ options that reproduce it
    "encodec": (_encodec_rvq, dict(ema_size="raw", commitment_levels="first")),
    "moshi": (_moshi_rvq, dict(ema_size="raw_clamped", commitment_levels="all")),
}


def _vqfast_like(theirs, backend, **conventions):
    assert (theirs.layers[0]._codebook.decay, theirs.layers[0]._codebook.epsilon) == (DECAY, EPS)
    return ema_like(theirs, backend=backend, commitment_cost=1.0, **conventions).train()


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
    for name, value in ema_state(theirs).items():
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


# --- learned codebooks, level by level: descript-audio-codec (DAC) and SNAC ---------------

DAC_D, DAC_K, DAC_DIM = 24, 16, 4


def _dac_rvq(levels=3):
    quantize = third_party("dac.nn.quantize")
    if quantize is None:
        pytest.skip("descript-audio-codec is not installed")
    torch.manual_seed(0)
    return quantize.ResidualVectorQuantize(input_dim=DAC_D, n_codebooks=levels,
                                           codebook_size=DAC_K, codebook_dim=DAC_DIM).train()


def _train_dac_side_by_side(theirs, ours, steps):
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.003)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.003)
    for step in range(steps):
        x = torch.randn(2, DAC_D, 40, generator=torch.Generator().manual_seed(step))
        grad = torch.randn(2, DAC_D, 40, generator=torch.Generator().manual_seed(100 + step))
        x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        q_theirs, codes_theirs, _, commitment, codebook = theirs(x_theirs)
        loss_theirs = codebook + 0.25 * commitment  # DAC's weights of its two terms
        loss_ours, q_ours, _, codes_ours = ours(x_ours)
        assert torch.equal(codes_ours, codes_theirs), f"step {step}: codes"
        torch.testing.assert_close(q_ours, q_theirs, msg=f"step {step}: output")
        torch.testing.assert_close(loss_ours, loss_theirs, msg=f"step {step}: loss")
        for opt in (opt_theirs, opt_ours):
            opt.zero_grad()
        torch.autograd.backward((q_theirs, loss_theirs), (grad, torch.ones(())))
        torch.autograd.backward((q_ours, loss_ours), (grad, torch.ones(())))
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, msg=f"step {step}: input grad")
        opt_theirs.step()
        opt_ours.step()
    books = torch.stack([level.codebook.weight for level in theirs.quantizers])
    torch.testing.assert_close(ours.codebooks, books, msg=f"codebooks after {steps} steps")
    for level, theirs_level in enumerate(theirs.quantizers):
        for ours_proj, theirs_proj in ((ours.project_in[level], theirs_level.in_proj),
                                       (ours.project_out[level], theirs_level.out_proj)):
            weights = ours_proj.parametrizations.weight
            for mine, their in ((weights.original0, theirs_proj.weight_g),
                                (weights.original1, theirs_proj.weight_v),
                                (ours_proj.bias, theirs_proj.bias)):
                torch.testing.assert_close(mine, their.view(mine.shape),
                                           msg=f"level {level}'s projections after {steps} steps")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_residual_vq_reproduces_descript_audio_codec(backend):
    """DAC's quantizer: per level a weight-normed projection to 4 channels, the code chosen
    by cosine, the raw code output, and the residual's gradient through the projections.
    Trained with SGD side by side: codes, outputs, losses and input gradients at every
    step, the codebooks and projections at the end."""
    theirs = _dac_rvq()
    ours = dac_like(theirs, backend=backend).train()
    _train_dac_side_by_side(theirs, ours, steps=20 if backend == "torch" else 3)
    theirs.eval()
    ours.eval()
    x = torch.randn(3, DAC_D, 17)
    assert torch.equal(ours.encode(x, num_levels=2), theirs(x, n_quantizers=2)[1])
    codes = ours.encode(x)
    torch.testing.assert_close(ours.decode_indices(codes), theirs.from_codes(codes)[0])


@pytest.mark.parametrize("options,differs", [
    (dict(cosine=True, level_projections=True), "codes|output"),  # unit codes out
    (dict(cosine=False, level_projections=True), "codes"),  # a euclidean search
])
def test_each_dac_option_is_needed(options, differs):
    theirs = _dac_rvq()
    ours = dac_like(theirs, backend="torch", **options).train()
    with pytest.raises(AssertionError, match=differs):
        _train_dac_side_by_side(theirs, ours, steps=20)


def test_residual_vq_reproduces_snac():
    """SNAC's quantizer: DAC's levels, each pooled over time by its own stride (4, 2, 1)
    and repeated back. Codes (each level's repeated over its stride), outputs and input
    gradients equal while the projections train on the output's gradient."""
    vq = third_party("snac.vq")
    if vq is None:
        pytest.skip("snac is not installed")
    strides = (4, 2, 1)
    torch.manual_seed(0)
    theirs = vq.ResidualVectorQuantize(input_dim=DAC_D, codebook_size=DAC_K,
                                       codebook_dim=DAC_DIM, vq_strides=list(strides))
    ours = dac_like(theirs, backend="torch").train()
    assert ours.level_strides == strides
    opts = [torch.optim.SGD(m.parameters(), lr=0.003) for m in (theirs, ours)]
    for step in range(20):
        x = torch.randn(2, DAC_D, 32, generator=torch.Generator().manual_seed(step))
        grad = torch.randn(2, DAC_D, 32, generator=torch.Generator().manual_seed(100 + step))
        x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        q_theirs, codes_theirs = theirs(x_theirs)
        _, q_ours, _, codes_ours = ours(x_ours)
        for level, stride in enumerate(strides):
            assert torch.equal(codes_ours[:, level, ::stride], codes_theirs[level]), step
            assert torch.equal(codes_ours[:, level],
                               codes_theirs[level].repeat_interleave(stride, -1)), step
        torch.testing.assert_close(q_ours, q_theirs, msg=f"step {step}: output")
        for opt in opts:
            opt.zero_grad()
        q_theirs.backward(grad)
        q_ours.backward(grad)
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, msg=f"step {step}: input grad")
        for opt in opts:
            opt.step()
    ours.eval()
    x = torch.randn(1, DAC_D, 16)
    codes = ours.encode(x)
    torch.testing.assert_close(ours.decode_indices(codes),
                               theirs.from_codes([codes[:, lv, ::s] for lv, s in
                                                  enumerate(strides)]))


# --- Mimi: a semantic and an acoustic residual quantizer, bias-free projections -----------

def _moshi_split_quantizer(levels, dim, codebook_dim):
    vq = third_party("moshi.quantization.vq")
    if vq is None:
        pytest.skip("moshi is not installed")
    torch.manual_seed(0)
    split = vq.SplitResidualVectorQuantizer(
        n_q=levels, n_q_semantic=1, dimension=codebook_dim, input_dimension=dim,
        output_dimension=dim, bins=K, decay=DECAY, threshold_usage_ratio=0.0).train()
    for rvq in (split.rvq_first, split.rvq_rest):
        for layer in rvq.vq.layers:  # trained codebooks, as in _moshi_rvq
            book = layer._codebook
            book.embedding_sum.normal_()
            book.cluster_usage.uniform_(0.5, 2.0)
            book._initialized.fill_(1)
    return split


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_two_residual_vqs_reproduce_mimis_split_quantizer(backend):
    """moshi's ``SplitResidualVectorQuantizer`` (Mimi's: one semantic level, the acoustic
    levels apart, each with bias-free projections to the code space) is two ``ResidualVQ``
    with ``projection_bias=False`` and moshi's EMA rule, their outputs summed; its penalty
    is the mean of the levels' commitments; in eval its loss is 0 (``eval_loss="zero"``)."""
    levels, dim, code_dim = 4, 20, D
    split = _moshi_split_quantizer(levels, dim, code_dim)
    semantic, acoustic = (half.train() for half in mimi_like(split, backend=backend))
    assert semantic.project_in.bias is None and "bias" not in str(semantic.state_dict().keys())
    for step in range(20 if backend == "torch" else 3):
        x = torch.randn(2, dim, 40, generator=torch.Generator().manual_seed(step))
        grad = torch.randn(2, dim, 40, generator=torch.Generator().manual_seed(100 + step))
        x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        theirs = split(x_theirs, frame_rate=12)
        loss_s, q_s, _, codes_s = semantic(x_ours)
        loss_a, q_a, _, codes_a = acoustic(x_ours)
        assert torch.equal(torch.cat([codes_s, codes_a], 1), theirs.codes), f"step {step}"
        torch.testing.assert_close(q_s + q_a, theirs.x, msg=f"step {step}: output")
        torch.testing.assert_close((loss_s + loss_a) / levels, theirs.penalty,
                                   msg=f"step {step}: penalty")
        torch.autograd.backward((theirs.x, theirs.penalty), (grad, torch.ones(())))
        torch.autograd.backward((q_s + q_a, (loss_s + loss_a) / levels), (grad, torch.ones(())))
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, msg=f"step {step}: input grad")
    for ours, theirs in ((semantic, split.rvq_first), (acoustic, split.rvq_rest)):
        for name, value in ema_state(theirs.vq).items():
            torch.testing.assert_close(getattr(ours, name), value, rtol=1e-5, atol=1e-6)
    split.eval()
    x = torch.randn(1, dim, 9)
    with torch.no_grad():
        theirs = split(x, frame_rate=12)
        outputs = [half.eval()(x) for half in (semantic, acoustic)]
    assert theirs.penalty == 0 and all(out[0] == 0 for out in outputs)
    torch.testing.assert_close(outputs[0][1] + outputs[1][1], theirs.x)
    assert torch.equal(torch.cat([semantic.encode(x), acoustic.encode(x, num_levels=2)], 1),
                       split.encode(x)[:, :3])


def test_levels_first_codes_and_zero_eval_loss():
    """``codes_layout="levels_first"``: codes ``[Q, B, T]`` out of ``forward`` and
    ``encode``, taken by ``decode_indices``; ``eval_loss="zero"``: 0 outside training, the
    commitment in it; neither changes the output."""
    torch.manual_seed(0)
    default = vqfast.ResidualVQ(3, 8, 6, kmeans_init=False).eval()
    other = vqfast.ResidualVQ(3, 8, 6, kmeans_init=False, codes_layout="levels_first",
                              eval_loss="zero").eval()
    other.load_state_dict(default.state_dict())
    x = torch.randn(2, 6, 5)
    loss, q, _, codes = default(x)
    other_loss, other_q, _, other_codes = other(x)
    assert loss > 0 and other_loss == 0 and torch.equal(q, other_q)
    assert torch.equal(other_codes, codes.transpose(0, 1))
    assert torch.equal(other.encode(x, num_levels=2), default.encode(x, num_levels=2).transpose(0, 1))
    torch.testing.assert_close(other.decode_indices(other_codes), default.decode_indices(codes))
    assert other.train()(x)[0] == default.train()(x)[0]
    with pytest.raises(ValueError, match="eval_loss"):
        vqfast.ResidualVQ(3, 8, 6, eval_loss=0)
    with pytest.raises(ValueError, match="codes_layout"):
        vqfast.ResidualVQ(3, 8, 6, codes_layout="QB")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_level_by_level_options(backend):
    """The level-by-level path keeps ``ResidualVQ``'s contract: masks (masked positions
    give back their input, take no part, code -1), ``num_levels``, the loss breakdown,
    quantize dropout (dropped levels: code -1, nothing added), k-means init, and
    ``encode``/``decode_indices`` agreeing with the eval forward."""
    torch.manual_seed(0)
    rvq = vqfast.ResidualVQ(3, 8, 10, ema=False, codebook_dim=4, cosine="search",
                            level_projections=True, level_strides=(2, 1, 1), backend=backend)
    x = torch.randn(2, 10, 12)
    loss, q, perplexity, codes = rvq.train()(x)  # k-means on the first batch
    assert bool(rvq.initialized) and torch.isfinite(rvq.codebooks).all()
    assert codes.shape == (2, 3, 12) and perplexity.shape == (3,)
    assert torch.equal(codes[:, 0, ::2], codes[:, 0, 1::2])  # stride 2: codes repeat
    rvq.eval()
    loss, q, _, codes = rvq(x)
    assert torch.equal(rvq.encode(x), codes)
    torch.testing.assert_close(rvq.decode_indices(codes), q)
    assert torch.equal(rvq.encode(x, num_levels=2), codes[:, :2])
    loss2, q2, _, codes2 = rvq(x, num_levels=2)
    torch.testing.assert_close(rvq.decode_indices(codes2), q2)
    breakdown = rvq(x, return_loss_breakdown=True)[-1]
    torch.testing.assert_close(breakdown.commitment + breakdown.codebook, loss)
    torch.testing.assert_close(breakdown.commitment, loss * 0.25 / 1.25)

    plain = vqfast.ResidualVQ(3, 8, 10, ema=False, codebook_dim=4, level_projections=True,
                              kmeans_init=False, backend=backend).eval()
    mask = torch.arange(12) < 7
    loss_m, q_m, _, codes_m = plain(x, mask=mask.expand(2, 12))
    loss_r, q_r, _, codes_r = plain(x[..., :7].contiguous())
    torch.testing.assert_close(q_m[..., :7], q_r)
    assert torch.equal(q_m[..., 7:], x[..., 7:]) and (codes_m[..., 7:] == -1).all()
    assert torch.equal(codes_m[..., :7], codes_r)
    torch.testing.assert_close(loss_m, loss_r)

    dropout = vqfast.ResidualVQ(4, 8, 10, ema=False, codebook_dim=4, level_projections=True,
                                kmeans_init=False, quantize_dropout=True, backend=backend)
    seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        _, q_d, _, codes_d = dropout.train()(x)
        ran = (codes_d >= 0).all(-1).all(0)  # [Q]: which levels ran
        n = int(ran.sum())
        assert torch.equal(ran, torch.arange(4) < n)
        seen.add(n)
        torch.testing.assert_close(q_d, dropout.decode_indices(codes_d[:, :n]))
    assert len(seen) > 1


def test_level_by_level_refuses_what_it_cannot_do():
    make = lambda **kw: vqfast.ResidualVQ(2, 8, 6, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="codebook_dim"):
        make(level_projections=True, ema=False)
    with pytest.raises(ValueError, match="ema=False"):
        make(level_projections=True, codebook_dim=3)
    with pytest.raises(ValueError, match="level_strides"):
        make(level_strides=(2,), ema=False)
    with pytest.raises(ValueError, match="cosine"):
        make(cosine="unit")
    rvq = make(level_strides=(4, 2), ema=False, kmeans_init=False)
    with pytest.raises(ValueError, match="multiple"):
        rvq(torch.randn(1, 6, 10))
    with pytest.raises(ValueError, match="one of 6"):  # every stride: their lcm, not the max
        make(level_strides=(3, 2), ema=False, kmeans_init=False)(torch.randn(1, 6, 3))
    with pytest.raises(ValueError, match="mask"):
        rvq(torch.randn(1, 6, 8), mask=torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B, D, T\]"):
        rvq(torch.randn(1, 6, 4, 4))


def _step_with_the_same_draws(theirs, ours, step):
    """One training step of each from the same random state (their k-means and expiry
    draw rows): the codes must be equal; returns both outputs."""
    x = torch.randn(2, D, 40, generator=torch.Generator().manual_seed(step))
    torch.manual_seed(1000 + step)
    q_theirs, codes_theirs = theirs(x)[:2]
    torch.manual_seed(1000 + step)
    _, q_ours, _, codes_ours = ours(x)
    assert torch.equal(codes_ours.transpose(0, 1), codes_theirs), f"step {step}: codes"
    return q_theirs, q_ours


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_moshis_dead_code_rule(backend):
    """moshi's expiry (every 5 steps, before the EMA update: codes used less than 0.1 x the
    mean take a residual row of the batch, at the mean usage) is
    ``dead_code_rule="relative"``, ``dead_code_threshold=0.1``, ``dead_code_every=5``. With
    the same random state before each step, codes and state agree with moshi's through
    four expiries, codes replaced at each."""
    theirs = _moshi_rvq(threshold_usage_ratio=0.1, rare_codes=True)  # every 5 steps: its default
    assert theirs.layers[0]._codebook.check_unused_every == 5
    ours = ema_like(theirs, backend=backend, commitment_cost=1.0, ema_size="raw_clamped",
                    dead_code_rule="relative", dead_code_threshold=0.1,
                    dead_code_every=5).train()
    steps = 20 if backend == "torch" else 5
    for step in range(steps):
        q_theirs, q_ours = _step_with_the_same_draws(theirs, ours, step)
        torch.testing.assert_close(q_ours, q_theirs, msg=f"step {step}: output")
        for name, value in ema_state(theirs).items():
            torch.testing.assert_close(getattr(ours, name), value, rtol=1e-5, atol=1e-5,
                                       msg=f"{name} after step {step}")
    assert int(ours.reseeded_codes.sum()) >= Q * (K // 3)  # the first expiry alone
    with pytest.raises(ValueError, match="dead_code_rule"):
        vqfast.ResidualVQ(2, 8, 4, dead_code_rule="mean")
    with pytest.raises(ValueError, match="shared_codebook"):
        vqfast.ResidualVQ(2, 8, 4, dead_code_rule="relative", shared_codebook=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_encodecs_kmeans_init(backend):
    """encodec's k-means init (its first training batch, level by level) draws its starting
    rows as vqfast's does; it then stores the centroids themselves as ``embed_avg`` and the
    raw counts as ``cluster_size`` (``kmeans_state="raw"``), so its first update shrinks
    the codes. With the same random state, codes and state agree with encodec's from the
    k-means step on (its expiry off: its draws would come between the levels' k-means);
    with vqfast's default convention they part at once."""
    core_vq = third_party("encodec.quantization.core_vq")
    if core_vq is None:
        pytest.skip("encodec is not installed")
    for state, agrees in (("raw", True), ("weighted", False)):
        torch.manual_seed(0)
        theirs = core_vq.ResidualVectorQuantization(
            num_quantizers=Q, dim=D, codebook_size=K, decay=DECAY, epsilon=EPS,
            kmeans_init=True, kmeans_iters=10, threshold_ema_dead_code=0).train()
        ours = vqfast.ResidualVQ(Q, K, D, commitment_cost=1.0, decay=DECAY, epsilon=EPS,
                                 kmeans_init=True, kmeans_iters=10, dead_code_threshold=0,
                                 ema_size="raw", commitment_levels="first",
                                 kmeans_state=state, backend=backend).train()
        for step in range(4 if backend == "triton" else 20):
            q_theirs, q_ours = _step_with_the_same_draws(theirs, ours, step)
            same = all(torch.allclose(getattr(ours, name), value, rtol=1e-5, atol=1e-5)
                       for name, value in ema_state(theirs).items())
            assert same == agrees, (state, step)
            if not agrees:  # (the default's state parts after the first step)
                break
            torch.testing.assert_close(q_ours, q_theirs)


def test_what_review_found(monkeypatch):
    """Edge cases of the codec options: a shared codebook trained on its first levels only
    never reads the unwritten statistics of the others; moshi's expiry on a non-finite
    batch replaces nothing, and under a mask draws only true residuals of real rows; the
    level-by-level path keeps the inputs' spatial shape; combinations that would be
    silently ignored are refused."""
    torch.manual_seed(0)
    real_new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda self, *a, **k: real_new_empty(self, *a, **k).fill_(float("nan"))
                        if real_new_empty(self, *a, **k).is_floating_point()
                        else real_new_empty(self, *a, **k))
    shared = vqfast.ResidualVQ(4, 16, 8, shared_codebook=True, kmeans_init=False,
                               backend="torch").train()
    shared(torch.randn(2, 8, 10), num_levels=2)
    assert torch.isfinite(shared.codebooks).all() and torch.isfinite(shared.ema_weight).all()
    monkeypatch.undo()

    rvq = vqfast.ResidualVQ(2, 16, 4, dead_code_rule="relative", dead_code_threshold=0.5,
                            kmeans_init=False, backend="torch").train()
    rvq(torch.randn(2, 4, 10))
    before = {k: v.clone() for k, v in rvq.state_dict().items() if torch.is_tensor(v)}
    x = torch.randn(2, 4, 10)
    x[0, :, 3] = float("nan")
    rvq(x)
    for name in ("codebooks", "ema_weight", "ema_cluster_size"):
        assert torch.equal(getattr(rvq, name), before[name]), name

    rvq = vqfast.ResidualVQ(2, 64, 4, dead_code_rule="relative", dead_code_threshold=1e9,
                            decay=1 - 1e-7, kmeans_init=False, backend="torch").train()
    x = torch.randn(1, 4, 40)
    mask = torch.zeros(1, 40, dtype=torch.bool)
    mask[0, :8] = True
    with torch.no_grad():  # a trained state: every code used once
        rvq.ema_cluster_size.fill_(1.0)
        rvq.ema_weight.copy_(rvq.codebooks)
    codebooks = rvq.codebooks.clone()
    rvq(x, mask=mask)  # every code expires: level l's take real rows' level-l residuals
    rows = x[0].t()[:8]
    first = codebooks[0][vqfast.reference.nearest_code(rows, codebooks[0])]
    for level, allowed in ((0, rows), (1, rows - first)):  # (decay ~1: the samples stay)
        dist = torch.cdist(rvq.codebooks[level], allowed).min(1).values
        assert (dist < 1e-3).all(), level

    deep = vqfast.ResidualVQ(3, 8, 6, ema=False, codebook_dim=4, level_projections=True,
                             kmeans_init=False)
    loss, q, _, codes = deep(torch.randn(2, 6, 3, 5))
    assert q.shape == (2, 6, 3, 5) and codes.shape == (2, 3, 3, 5)
    assert deep.encode(torch.randn(2, 6, 3, 5)).shape == (2, 3, 3, 5)
    for bad, match in ((dict(ema=False, codebook_dim=4, level_strides=(1, 2)), "level_projections"),
                       (dict(codes_layout="levels_first", channel_last=True), "channels-first"),
                       (dict(ema=False, kmeans_state="raw"), "ema=True"),
                       (dict(dead_code_every=5), "relative")):
        with pytest.raises(ValueError, match=match):
            vqfast.ResidualVQ(2, 16, 8, **bad)
    assert vqfast.ResidualVQ(2, 16, 8, cosine=torch.tensor(True).item()).cosine is True
