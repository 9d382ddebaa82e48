"""Regression tests for the second adversarial review and a newcomer's first hour
(issue 23), one per item, on both backends. Each failed on the code before its fix."""

import math

import pytest
import torch

import vqfast
from vqfast import reference
from _util import ORIGINAL, BACKENDS, DEVICE, tensor_state


def _rotation_grad_oracle(x, codes, g):
    """The paper's lambda R^T g in float64 (autograd of ``reference.rotate_to``), rows
    ``[N, d]``, with its documented straight-through rule for near-zero inputs."""
    e = x.double().clone().requires_grad_()
    (reference.rotate_to(e, codes.double()) * g.double()).sum().backward()
    return e.grad


def _rotation_case(backend, codebook, x_rows):
    """Gradient of ``sum(quantized * g)`` for ``[N, d]`` rows through a one-code quantizer."""
    k, d = codebook.shape
    vq = vqfast.VectorQuantizerEMA(k, d, 0.25, rotation_trick=True, backend=backend, **ORIGINAL).to(DEVICE)
    vq.codebook.copy_(codebook)
    vq.eval()
    x = x_rows.T.reshape(1, d, -1).to(DEVICE).requires_grad_()
    g = torch.randn_like(x)
    _, quantized, _, codes = vq(x)
    (quantized * g).sum().backward()
    q = codebook[codes.reshape(-1).cpu()]
    expected = _rotation_grad_oracle(x_rows, q, g.detach().cpu()[0].T)
    return x.grad.cpu()[0].T.double(), expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation_trick_near_antiparallel_matches_the_paper(backend):
    """Item 1: the issue's repro (one channel, e = -q direction) and 2-D vectors within
    0.001 to 1 degree of antiparallel to their code."""
    got, expected = _rotation_case(backend, torch.tensor([[-0.1071]]),
                                   torch.tensor([[0.0112], [0.00079], [0.5]]))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert got.abs().max() < 200
    angles = torch.tensor([179.999, 179.99, 179.9, 179.0])  # degrees from the code
    x = torch.stack([torch.cos(torch.deg2rad(angles)), torch.sin(torch.deg2rad(angles))], 1)
    got, expected = _rotation_case(backend, torch.tensor([[1.3, 0.0]]), x)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation_trick_zero_input_falls_back_to_straight_through(backend, dtype):
    """Item 3: a zero (or tiny) input row gets ``g``, not ``|q| * 1e12`` (or inf in fp16);
    rows of ordinary length still get the rotation."""
    if dtype == torch.float16 and DEVICE.type == "cpu" and backend == "torch":
        pass  # the torch path computes in fp32 and returns fp16: covered the same way
    codebook = torch.tensor([[0.8, -0.6, 0.5]])
    x = torch.tensor([[0.0, 0.0, 0.0], [1e-9, 0.0, 0.0], [0.3, 0.2, -0.1]])
    vq = vqfast.VectorQuantizerEMA(1, 3, 0.25, rotation_trick=True, backend=backend, **ORIGINAL).to(DEVICE)
    vq.codebook.copy_(codebook)
    vq.eval()
    z = x.T.reshape(1, 3, 3).to(DEVICE, dtype).requires_grad_()
    g = torch.ones_like(z)
    _, quantized, _, _ = vq(z)
    (quantized * g).sum().backward()
    grad = z.grad.float().cpu()[0].T
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad[:2], torch.ones(2, 3))  # straight through
    expected = _rotation_grad_oracle(x, codebook.expand(3, 3), torch.ones(3, 3))
    torch.testing.assert_close(grad.double(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", ["ema", "plain", "residual"])
def test_non_finite_padding_under_a_mask_changes_nothing(make, backend):
    """Item 2: ``-inf`` (log-mel of silence) or NaN in masked-out positions: the loss and
    the EMA step are those of the real rows alone."""
    torch.manual_seed(0)
    build = {"ema": lambda: vqfast.VectorQuantizerEMA(7, 4, 0.25, backend=backend, **ORIGINAL),
             "plain": lambda: vqfast.VectorQuantizer(7, 4, 0.25, backend=backend, **ORIGINAL),
             "residual": lambda: vqfast.ResidualVQ(2, 7, 4, backend=backend, **ORIGINAL)}[make]
    padded, clean = build().to(DEVICE), None
    clean = build().to(DEVICE)
    clean.load_state_dict(padded.state_dict())
    z = torch.randn(2, 4, 5, device=DEVICE)
    mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    mask[1, 3:] = False
    dirty = z.clone()
    dirty[1, :, 3] = float("-inf")
    dirty[1, :, 4] = float("nan")
    out_dirty = padded(dirty, mask=mask)
    out_clean = clean(z, mask=mask)
    assert torch.isfinite(out_dirty[0])
    torch.testing.assert_close(out_dirty[0], out_clean[0])
    for key, value in tensor_state(clean).items():
        torch.testing.assert_close(padded.state_dict()[key], value, equal_nan=False)
    if make != "plain":
        assert int(padded.skipped_batches.sum() if hasattr(padded, "skipped_batches") else 0) == 0


# --- item 4: a state_dict records the options that change its meaning ------------------

MISMATCHED = {
    "cosine into euclidean (EMA)": (lambda: vqfast.VectorQuantizerEMA(8, 4, 0.25, cosine=True, **ORIGINAL),
                                    lambda: vqfast.VectorQuantizerEMA(8, 4, 0.25, **ORIGINAL)),
    "euclidean into cosine (plain)": (lambda: vqfast.VectorQuantizer(8, 4, 0.25, **ORIGINAL),
                                      lambda: vqfast.VectorQuantizer(8, 4, 0.25, cosine=True, **ORIGINAL)),
    "EMA into plain": (lambda: vqfast.VectorQuantizerEMA(8, 4, 0.25, **ORIGINAL),
                       lambda: vqfast.VectorQuantizer(8, 4, 0.25, **ORIGINAL)),
    "residual euclidean into cosine": (lambda: vqfast.ResidualVQ(2, 8, 4, **ORIGINAL),
                                       lambda: vqfast.ResidualVQ(2, 8, 4, cosine=True, **ORIGINAL)),
    "residual levels/groups": (lambda: vqfast.ResidualVQ(4, 16, 8, **ORIGINAL),
                               lambda: vqfast.ResidualVQ(2, 16, 16, groups=2, **ORIGINAL)),
    "residual shared, other depth": (lambda: vqfast.ResidualVQ(2, 8, 4, shared_codebook=True, **ORIGINAL),
                                     lambda: vqfast.ResidualVQ(6, 8, 4, shared_codebook=True, **ORIGINAL)),
    "FSQ levels": (lambda: vqfast.FSQ([8, 5, 5, 5]), lambda: vqfast.FSQ([4, 4, 4, 4])),
}


@pytest.mark.parametrize("case", MISMATCHED)
def test_state_of_other_options_does_not_load(case):
    make_source, make_target = MISMATCHED[case]
    source, target = make_source(), make_target()
    before = {k: v.clone() for k, v in tensor_state(target).items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match="does not load into") as error:
        target.load_state_dict(source.state_dict())
    assert type(source).__name__ in str(error.value) and type(target).__name__ in str(error.value)
    for key, value in tensor_state(target).items():  # nothing was copied
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, before[key]), key


def test_state_of_another_class_names_the_class_and_other_options_name_the_option():
    with pytest.raises(ValueError, match="it is the state of a VectorQuantizerEMA, not of a "
                                         "VectorQuantizer: load it into a VectorQuantizerEMA"):
        vqfast.VectorQuantizer(8, 4).load_state_dict(vqfast.VectorQuantizerEMA(8, 4).state_dict())
    with pytest.raises(ValueError, match=r"they differ in cosine=False \(this module: True\)"):
        vqfast.VectorQuantizerEMA(8, 4, cosine=True).load_state_dict(
            vqfast.VectorQuantizerEMA(8, 4).state_dict())


def test_states_without_recorded_options_still_load():
    """Checkpoints saved before the options were recorded (and the original notebook's)."""
    source = vqfast.ResidualVQ(2, 8, 4, cosine=True, **ORIGINAL)
    state = {k: v for k, v in tensor_state(source).items() if k != "_extra_state"}
    target = vqfast.ResidualVQ(2, 8, 4, cosine=True, **ORIGINAL)
    target.load_state_dict(state)
    assert torch.equal(target.codebooks, source.codebooks)
    same = vqfast.VectorQuantizerEMA(8, 4, 0.25, **ORIGINAL)
    same.load_state_dict(vqfast.VectorQuantizerEMA(8, 4, 0.25, **ORIGINAL).state_dict())


# --- item 5: the cosine quantizers normalise whatever codebook they hold ------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", ["ema", "residual-ema"])
def test_cosine_ema_with_unnormalised_codebook_picks_by_cosine(make, backend):
    torch.manual_seed(0)
    if make == "ema":
        vq = vqfast.VectorQuantizerEMA(18, 5, 0.25, cosine=True, backend=backend, **ORIGINAL).to(DEVICE)
        vq.codebook.copy_(torch.randn(18, 5) * torch.rand(18, 1) * 10)
        codebook = vq.codebook
    else:
        vq = vqfast.ResidualVQ(1, 18, 5, cosine=True, backend=backend, **ORIGINAL).to(DEVICE)
        vq.codebooks.copy_(torch.randn(1, 18, 5) * torch.rand(1, 18, 1) * 10)
        codebook = vq.codebooks[0]
    vq.eval()
    z = torch.randn(2, 5, 9, device=DEVICE)
    _, quantized, _, codes = vq(z)
    rows = z.movedim(1, -1).reshape(-1, 5)
    cosine = torch.nn.functional.normalize(rows, dim=1) @ torch.nn.functional.normalize(codebook, dim=1).T
    assert torch.equal(codes.reshape(-1), cosine.argmax(1))
    unit = torch.nn.functional.normalize(codebook, dim=1)[codes.reshape(-1)]
    torch.testing.assert_close(quantized.movedim(1, -1).reshape(-1, 5), unit)


# --- item 6: LFQ's output is exactly ±1 ------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lfq_output_is_plus_minus_one_for_large_inputs(dtype):
    lfq = vqfast.LFQ(3)
    z = torch.tensor([[[258.0], [-300.0], [3000.0]]]).to(dtype)
    if dtype == torch.float32:
        z = torch.tensor([[[3e7], [-300.0], [1e30]]])
    z.requires_grad_()
    _, quantized, _, codes = lfq(z)
    assert torch.equal(quantized.detach().float(), torch.tensor([[[1.0], [-1.0], [1.0]]]))
    assert torch.equal(lfq.decode_indices(codes), quantized.detach().float())
    quantized.sum().backward()
    assert torch.isfinite(z.grad.float()).all()


# --- item 7: decode_indices validates its codes -----------------------------------------

DECODERS = {
    "VectorQuantizerEMA": (lambda: vqfast.VectorQuantizerEMA(7, 3, 0.25, **ORIGINAL), 7, [1, 4]),
    "VectorQuantizer": (lambda: vqfast.VectorQuantizer(7, 3, 0.25, **ORIGINAL), 7, [1, 4]),
    "ResidualVQ": (lambda: vqfast.ResidualVQ(2, 7, 3, **ORIGINAL), 7, [1, 2, 4]),
    "FSQ": (lambda: vqfast.FSQ([8, 5, 5, 5]), 1000, [1, 4]),
    "LFQ": (lambda: vqfast.LFQ(4), 16, [1, 4]),
}


@pytest.mark.parametrize("name", DECODERS)
def test_decode_indices_rejects_bad_codes(name):
    make, size, shape = DECODERS[name]
    module = make()
    good = torch.zeros(shape, dtype=torch.int64)
    module.decode_indices(good)
    for bad in (size, size + 500, -2):
        with pytest.raises(ValueError, match="codes must lie in"):
            module.decode_indices(torch.full(shape, bad, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer"):
        module.decode_indices(good.float())
    if name == "LFQ":  # no "not quantized" code there
        with pytest.raises(ValueError, match="codes must lie in"):
            module.decode_indices(torch.full(shape, -1, dtype=torch.int64))


# --- item 8: argument checks of FSQ and LFQ ---------------------------------------------

@pytest.mark.parametrize("levels,error", [([2.5, 4], ValueError), ("85", TypeError),
                                          ([256] * 8, ValueError), ([], ValueError),
                                          ([1, 4], ValueError), (8, TypeError)])
def test_fsq_rejects_bad_levels(levels, error):
    with pytest.raises(error):
        vqfast.FSQ(levels)


@pytest.mark.parametrize("dim", [0, -1, 2.5])
def test_fsq_rejects_bad_dim(dim):
    with pytest.raises(ValueError, match="dim"):
        vqfast.FSQ([8, 5], dim=dim)


@pytest.mark.parametrize("dim", [3.5, 0, 25, True])
def test_lfq_rejects_bad_dim(dim):
    with pytest.raises(ValueError, match="dim"):
        vqfast.LFQ(dim)


def test_lfq_warns_of_the_cost_of_a_wide_exact_entropy():
    with pytest.warns(UserWarning, match="2\\*\\*20 codes"):
        vqfast.LFQ(20)
    vqfast.LFQ(20, diversity_gamma=0.0)  # no entropy over all codes: no warning


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsq_nan_input_gets_code_minus_one(backend):
    fsq = vqfast.FSQ([8, 5, 5], backend=backend).to(DEVICE)
    z = torch.randn(1, 3, 4, device=DEVICE)
    z[0, 1, 2] = float("nan")
    quantized, codes = fsq(z)
    assert codes[0, 2] == -1 and bool((codes[0, [0, 1, 3]] >= 0).all())
    assert torch.isnan(fsq.decode_indices(codes)[0, :, 2]).all()


# --- item 9: an all-True mask is no mask; FSQ's projections take the input's dtype ------

@pytest.mark.parametrize("make", ["ema", "residual"])
def test_all_true_mask_gives_the_same_kmeans_init(make):
    build = {"ema": lambda: vqfast.VectorQuantizerEMA(6, 3, 0.25, kmeans_init=True, backend="torch"),
             "residual": lambda: vqfast.ResidualVQ(2, 6, 3, kmeans_init=True, backend="torch")}[make]
    z = torch.randn(2, 3, 10)
    results = []
    for mask in (None, torch.ones(2, 10, dtype=torch.bool)):
        torch.manual_seed(7)
        module = build()
        module(z, mask=mask)
        results.append(tensor_state(module))
    for key, value in results[0].items():
        assert torch.equal(results[1][key], value), key


@pytest.mark.parametrize("cast", ["half", "double"])
def test_fsq_with_projection_cast_takes_fp32_input(cast):
    fsq = getattr(vqfast.FSQ([8, 5, 5], dim=6, backend="torch"), cast)()
    quantized, codes = fsq(torch.randn(2, 6, 5))
    assert quantized.shape == (2, 6, 5) and codes.shape == (2, 5)
    assert fsq.params.dtype == torch.float32


# --- a collapsed codebook is caught early (issue 20, item 5) -----------------------------

@pytest.mark.parametrize("make", ["ema", "plain", "residual"])
def test_warn_on_collapse_warns_once_after_the_streak(make):
    build = {"ema": lambda: vqfast.VectorQuantizerEMA(100, 4, 0.25, backend="torch", **ORIGINAL),
             "plain": lambda: vqfast.VectorQuantizer(100, 4, 0.25, backend="torch", **ORIGINAL),
             "residual": lambda: vqfast.ResidualVQ(2, 100, 4, quantize_dropout=True, backend="torch", **ORIGINAL)}[make]
    vq = build().warn_on_collapse(steps=3)
    same = torch.ones(2, 4, 6)  # every vector the same: one code in use, 1% of 100
    import warnings as w
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        for _ in range(3):
            vq(same)
        assert not caught  # a streak of 3 is read one step late
        for _ in range(3):
            vq(same)
    assert len(caught) == 1 and "collapsed" in str(caught[0].message)


def test_warn_on_collapse_stays_quiet_while_codes_are_used():
    vq = vqfast.VectorQuantizerEMA(20, 4, 0.25, backend="torch", **ORIGINAL).warn_on_collapse(steps=2)
    import warnings as w
    with w.catch_warnings():
        w.simplefilter("error")
        for _ in range(6):
            vq(torch.randn(2, 4, 50))
        vq.eval()
        for _ in range(4):  # eval mode does not count
            vq(torch.ones(2, 4, 6))


def test_codebook_usage_prints_one_line():
    vq = vqfast.VectorQuantizerEMA(512, 4, 0.25, backend="torch", **ORIGINAL)
    vq(torch.randn(2, 4, 30))
    text = repr(vq.codebook_usage())
    assert "\n" not in text and "of 512 codes alive" in text and len(text) < 200


# --- items 12 and 13: benchmark reports in words, error hints ---------------------------

def test_benchmark_table_leaves_out_what_could_not_run_and_says_ratios_in_words():
    from benchmarks import suite
    env = dict(device="x86_64", device_type="cpu", cpu_threads=2, torch="t", triton="t",
               vqfast="v", date="d")
    rows = [suite.Result("reference", "ema_step", "vqvae", 1, 1, 1, "float32", 150.0, 100.0, 1.0, 1.0),
            suite.Result("vqfast[torch]", "ema_step", "vqvae", 1, 1, 1, "float32", 35.0, 15.3, 4.3, 0.153),
            suite.Result("vqfast[triton]", "ema_step", "vqvae", 1, 1, 1, "float32",
                         skipped="Triton backend needs a CUDA device")]
    table = suite.markdown(env, rows, note="pipeline check")
    assert "**pipeline check**" in table
    assert "| vqvae | ema_step | float32 | vqfast[triton]" not in table
    assert "- vqfast[triton] (every case): Triton backend needs a CUDA device" in table
    assert suite._ratio_label(rows[1]) == "4.3x faster\n7x less memory"
    assert suite._ratio_label(suite.Result("x", "o", "s", 1, 1, 1, "f", 1.0, 1.0, 0.5, 1.0)) \
        == "2.0x slower\n1.00x the memory"


def test_benchmark_table_states_ratios_in_the_readmes_words():
    from benchmarks import suite
    env = dict(device="x86_64", device_type="cpu", cpu_threads=2, torch="t", triton="t",
               vqfast="v", date="d")
    rows = [suite.Result("reference", "nearest", "vqvae", 1, 1, 1, "float32", 100.3, 96.0, 1.0, 1.0),
            suite.Result("vqfast[torch]", "nearest", "vqvae", 1, 1, 1, "float32", 28.7, 8.3,
                         100.3 / 28.7, 8.3 / 96.0),
            suite.Result("vqp", "nearest", "vqvae", 1, 1, 1, "float32", 258.9, 196.1,
                         100.3 / 258.9, 196.1 / 96.0),
            suite.Result("vqfast[torch]", "nearest", "K=16384", 1, 1, 1, "float32", 1.0, 24.3,
                         7.6, 24.3 / 3076.0)]
    table = suite.markdown(env, rows)
    assert "vs the original: time | vs the original: memory" in table
    assert "| 100.300 | 96.0 | 1x | 1x |" in table
    assert "| 3.5x faster | 11.6x less |" in table  # as the README writes it, not 0.087
    assert "| 2.6x slower | 2.0x more |" in table
    assert "| 7.6x faster | 127x less |" in table


def test_cpu_timings_run_on_the_threads_the_report_names():
    from benchmarks import measure, suite
    seen = []
    cpu = torch.device("cpu")
    measure.median_seconds(lambda: seen.append(torch.get_num_threads()), cpu)
    with measure.timing_threads(cpu):
        seen.append(torch.get_num_threads())
    timed = set(seen[1:])  # the first call is median_seconds' untimed warm-up
    assert timed == {measure.CPU_TIMING_THREADS} == {suite.environment(cpu)["cpu_threads"]}
    assert "(cpu, 1 thread)" in suite.device_line(suite.environment(cpu))


def test_train_benchmark_times_the_steady_step_with_the_quantizers_default(tmp_path):
    from benchmarks import train
    out = tmp_path / "train.json"
    assert train.main(["--dry-run", "--out", str(out), "--parts", "eager", "--steps", "2",
                       "--warmup-steps", "2"]) == 0
    eager = __import__("json").loads(out.read_text())["parts"]["eager"]
    assert eager["warmup_steps"] == 2 and eager["timed_steps"] == 2
    assert eager["step_ms"] == pytest.approx(1e3 / eager["steps_per_s"])
    args = __import__("argparse").Namespace(num_hiddens=8, num_embeddings=16, kmeans_init=True,
                                            dead_code_threshold=None)
    assert train._model(args, torch.device("cpu")).vq.dead_code_threshold == 0.5


def test_error_hints_for_common_mistakes():
    vq = vqfast.VectorQuantizerEMA(8, 4, 0.25, **ORIGINAL)
    with pytest.raises(ValueError, match=r"channels-last.*movedim\(-1, 1\)"):
        vq(torch.randn(2, 5, 5, 4))
    with pytest.raises(ValueError, match="inputs.T.unsqueeze"):
        vq(torch.randn(10, 4))
    import numpy as np
    with pytest.raises(TypeError, match="torch.from_numpy"):
        vq(np.zeros((2, 4, 3), dtype=np.float32))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            vq.cuda()
