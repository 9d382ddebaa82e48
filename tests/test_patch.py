"""``vqfast.patch`` in models other libraries wrote: convergence tests in the manner of
Liger-Kernel's. Each target is built small from its own library's config or constructor
with random weights (and random codebooks, as a checkpoint would bring), then run with and
without the patch from the same state and seeds: training steps for the quantizers that
train (every step's loss, the outputs, the input gradients, the final parameters and EMA
buffers), encode/decode for the inference-only ports (codes, reconstructions). Codes must
be equal, or a tie within fp32 rounding of the two codes' distances; state dicts round-trip
between patched and unpatched models.

The same check must fail on a deliberately wrong patch (``test_a_wrong_patch_fails``): the
search of the torch path, which every patched method reaches, returns the next code."""

import copy
import types

import pytest
import torch

import vqfast
from benchmarks.patched import random_codebooks, third_party
from vqfast import _torch, reference

def _import(name: str):
    """A third-party module (imported as ``benchmarks.patched.third_party`` does), or skip
    when its library is not installed."""
    module = third_party(name)
    if module is None:
        pytest.skip(f"{name.split('.')[0]} is not installed")
    return module


# --- the checks ---------------------------------------------------------------------------

def assert_codes_match(x, codebook, got, want, cosine=False, rtol=1e-5):
    """Codes equal, or, where not, a tie: both codes' distances to the row (float64) within
    ``rtol``; and at most 1% of the rows tied."""
    got, want = got.reshape(-1), want.reshape(-1)
    assert got.shape == want.shape
    differ = got != want
    if not differ.any():
        return
    x = x.reshape(-1, codebook.shape[1]).double()[differ]
    e = codebook.double()
    if cosine:
        x, e = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(e, dim=1)
    d_got = ((x - e[got[differ]]) ** 2).sum(1)
    d_want = ((x - e[want[differ]]) ** 2).sum(1)
    gap = ((d_got - d_want).abs() / d_want.clamp_min(1e-12)).max().item()
    assert gap <= rtol, f"{int(differ.sum())} codes differ and are not ties (gap {gap:.2e})"
    assert differ.float().mean() <= 0.01, f"{int(differ.sum())} of {got.numel()} codes are ties"


def assert_close_tree(a, b, atol, rtol, what=""):
    """Tensors (or nested tuples/lists/dicts/outputs of them) equal within tolerances."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), what
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
        else:
            assert torch.equal(a, b), f"{what}: {int((a != b).sum())} integers differ"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_close_tree(a[k], b[k], atol, rtol, f"{what}.{k}")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), what
        for i, (u, v) in enumerate(zip(a, b)):
            assert_close_tree(u, v, atol, rtol, f"{what}[{i}]")
    elif hasattr(a, "to_tuple"):  # transformers' ModelOutput
        assert_close_tree(a.to_tuple(), b.to_tuple(), atol, rtol, what)
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def _clone(model):
    """A copy with the same state: a deep copy, or (modules with torch's old weight_norm,
    which cannot be deep-copied) the builder's twin with the state loaded."""
    twin = model.__dict__.get("_twin")
    if twin is None:
        return copy.deepcopy(model)
    clone = twin()
    clone.load_state_dict(model.state_dict())
    return clone


def _patched_pair(model, backend="auto"):
    """The model and a patched copy of it (same state)."""
    patched = _clone(model)
    report = vqfast.patch(patched, backend=backend)
    assert len(report) > 0, f"nothing patched in {type(model).__name__}"
    return model, patched


def _roundtrip_state(model, patched):
    """Checkpoints load both ways with the same keys."""
    assert list(model.state_dict()) == list(patched.state_dict())
    fresh = _clone(model)
    fresh.load_state_dict(patched.state_dict())
    patched.load_state_dict(model.state_dict())
    assert_close_tree(fresh.state_dict(), model.state_dict(), 0, 0, "state")


def train_side_by_side(model, batches, loss_of, steps, atol=1e-5, rtol=1e-4, lr=0.05,
                       backend="auto"):
    """Train the model and a patched copy ``steps`` steps from the same state and seeds;
    compare every step's loss and outputs, the input gradients, then the final state."""
    model, patched = _patched_pair(model, backend)
    _roundtrip_state(model, patched)
    optims = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad] or
                               [torch.zeros(1, requires_grad=True)], lr=lr)
              for m in (model, patched)]
    for step in range(steps):
        x = batches(step)
        results = []
        for m, opt in zip((model, patched), optims):
            torch.manual_seed(1000 + step)  # the same draws for any random choice inside
            xi = x.clone().requires_grad_()
            out = m(xi)
            loss = loss_of(out, xi)
            loss.backward()
            opt.step()
            opt.zero_grad()
            results.append((loss.detach(), out, xi.grad))
        assert_close_tree(results[1], results[0], atol, rtol, f"step {step}")
    assert_close_tree(patched.state_dict(), model.state_dict(), atol, rtol, "final state")
    x = batches(steps)
    with torch.no_grad():  # and the trained pair in eval mode
        outputs = [m.eval()(x.clone()) for m in (model, patched)]
    assert_close_tree(outputs[1], outputs[0], atol, rtol, "eval")
    return model, patched


# --- training targets ---------------------------------------------------------------------

def _images(d):
    return lambda step: torch.randn(3, d, 5, 7, generator=torch.Generator().manual_seed(step))


def _notebook(ema):
    torch.manual_seed(0)
    vq = (reference.VectorQuantizerEMA(48, 12, 0.25, 0.99) if ema
          else reference.VectorQuantizer(48, 12, 0.25))
    return vq, _images(12), lambda out, x: out[0] + out[1].pow(2).mean()


def _diffusers(legacy):
    vae = _import("diffusers.models.autoencoders.vae")
    torch.manual_seed(0)
    vq = vae.VectorQuantizer(40, 12, beta=0.25, legacy=legacy)
    vq.embedding.weight.data.normal_()
    return vq, _images(12), lambda out, x: out[1] + out[0].pow(2).mean()


def _diffusers_vqmodel():
    vq_model = _import("diffusers.models.autoencoders.vq_model")
    torch.manual_seed(0)
    model = vq_model.VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                             layers_per_block=1, latent_channels=4, num_vq_embeddings=24,
                             vq_embed_dim=4, norm_num_groups=4, sample_size=8)
    model.quantize.embedding.weight.data.normal_()
    images = lambda step: torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(step))  # noqa: E731
    return model, images, lambda out, x: (out.sample - x).pow(2).mean() + out.commit_loss.sum()


def _hf_vqvae(which):
    module = _import(f"transformers.models.{which}.modeling_{which}")
    cls = getattr(module, f"{which.capitalize()}VQVAEVectorQuantizer")
    torch.manual_seed(0)
    vq = cls(types.SimpleNamespace(num_embeddings=40, embed_dim=12, beta=0.25, num_patches=4))
    vq.embedding.weight.data.normal_()
    return vq, _images(12), lambda out, x: out[1] + out[0].pow(2).mean()


def _encodec_rvq():
    core_vq = _import("encodec.quantization.core_vq")
    torch.manual_seed(0)
    rvq = core_vq.ResidualVectorQuantization(num_quantizers=3, dim=12, codebook_size=32,
                                             kmeans_init=True, kmeans_iters=2,
                                             threshold_ema_dead_code=2).train()
    frames = lambda step: torch.randn(2, 12, 40, generator=torch.Generator().manual_seed(step))  # noqa: E731
    return rvq, frames, lambda out, x: out[0].pow(2).mean() + out[2].sum()


def _moshi_rvq():
    core_vq = _import("moshi.quantization.core_vq")
    torch.manual_seed(0)
    rvq = core_vq.ResidualVectorQuantization(num_quantizers=3, codebook_offset=0, dim=12,
                                             codebook_size=32, decay=0.5,
                                             check_unused_every=2).train()
    for layer in rvq.layers:  # trained codebooks, as a checkpoint brings (moshi k-means
        book = layer._codebook  # -initialises a level only after the one before it, so
        book.embedding_sum.normal_()  # from scratch later levels start as all-zero ties)
        book.cluster_usage.uniform_(0.5, 2.0)
        book._initialized.fill_(1)
    frames = lambda step: torch.randn(2, 12, 40, generator=torch.Generator().manual_seed(step))  # noqa: E731
    return rvq, frames, lambda out, x: out.quantized.pow(2).mean() + out.loss.sum()


def _dac_rvq():
    quantize = _import("dac.nn.quantize")

    def build():
        torch.manual_seed(0)
        return quantize.ResidualVectorQuantize(input_dim=16, n_codebooks=3, codebook_size=32,
                                               codebook_dim=4).train()
    rvq = build()
    rvq.__dict__["_twin"] = build  # (weight_norm: no deep copies)
    frames = lambda step: torch.randn(2, 16, 40, generator=torch.Generator().manual_seed(step))  # noqa: E731
    return rvq, frames, lambda out, x: out[0].pow(2).mean() + out[3] + out[4]


def _tokens(d):
    return lambda step: torch.randn(3, 11, d, generator=torch.Generator().manual_seed(step))


def _vqp(**options):
    vqp = _import("vector_quantize_pytorch")
    torch.manual_seed(0)
    if "num_quantizers" in options:
        vq = vqp.ResidualVQ(dim=12, codebook_size=32, decay=0.9, **options)
    else:
        vq = vqp.VectorQuantize(dim=12, codebook_size=40, decay=0.9, **options)
    return vq, _tokens(12), lambda out, x: out[2].sum() + out[0].pow(2).mean()


TRAINED = {
    "notebook VectorQuantizer": lambda: _notebook(False),
    "notebook VectorQuantizerEMA": lambda: _notebook(True),
    "diffusers VectorQuantizer (legacy)": lambda: _diffusers(True),
    "diffusers VectorQuantizer": lambda: _diffusers(False),
    "diffusers VQModel": _diffusers_vqmodel,
    "transformers Chameleon": lambda: _hf_vqvae("chameleon"),
    "transformers Janus": lambda: _hf_vqvae("janus"),
    "encodec ResidualVectorQuantization (k-means, dead codes)": _encodec_rvq,
    "moshi ResidualVectorQuantization (dead codes)": _moshi_rvq,
    "descript-audio-codec ResidualVectorQuantize (learned, projections)": _dac_rvq,
    "vector-quantize-pytorch VectorQuantize (k-means, dead codes)":
        lambda: _vqp(kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=2),
    "vector-quantize-pytorch VectorQuantize (learnable, no EMA)":
        lambda: _vqp(learnable_codebook=True, ema_update=False, rotation_trick=False),
    "vector-quantize-pytorch ResidualVQ": lambda: _vqp(num_quantizers=3),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("target", list(TRAINED))
def test_training_converges_as_the_original(target, backend):
    model, batches, loss_of = TRAINED[target]()
    train_side_by_side(model, batches, loss_of, steps=12 if backend == "torch" else 3,
                       backend=backend)


# --- inference targets --------------------------------------------------------------------

def _randomise_codebooks(model):
    return random_codebooks(model, torch.Generator().manual_seed(5))


def _hf_encodec():
    hf = _import("transformers")
    torch.manual_seed(0)
    cfg = hf.EncodecConfig(codebook_size=64, codebook_dim=16, hidden_size=16, num_filters=4,
                           num_residual_layers=1, upsampling_ratios=[4, 4],
                           target_bandwidths=[1.5, 6.0], sampling_rate=4000, audio_channels=1,
                           num_lstm_layers=1)
    model = _randomise_codebooks(hf.EncodecModel(cfg).eval())
    audio = torch.randn(2, 1, 800, generator=torch.Generator().manual_seed(1))
    return model, [dict(input_values=audio, bandwidth=b) for b in (1.5, 6.0)]


def _hf_mimi():
    hf = _import("transformers")
    torch.manual_seed(0)
    cfg = hf.MimiConfig(hidden_size=32, num_filters=8, codebook_size=64, codebook_dim=16,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                        intermediate_size=64, upsampling_ratios=[4, 4], num_quantizers=6,
                        num_semantic_quantizers=1, sliding_window=16, head_dim=16,
                        upsample_groups=32, vector_quantization_hidden_dimension=16,
                        sampling_rate=1600, frame_rate=25)
    model = _randomise_codebooks(hf.MimiModel(cfg).eval())
    audio = torch.randn(2, 1, 1600, generator=torch.Generator().manual_seed(1))
    return model, [dict(input_values=audio, num_quantizers=n) for n in (2, 6)]


def _hf_dac():
    hf = _import("transformers")
    torch.manual_seed(0)
    cfg = hf.DacConfig(encoder_hidden_size=8, downsampling_ratios=[2, 4], decoder_hidden_size=32,
                       n_codebooks=4, codebook_size=64, codebook_dim=8, hidden_size=32)
    model = hf.DacModel(cfg).eval()
    audio = torch.randn(2, 1, 1024, generator=torch.Generator().manual_seed(1))
    return model, [dict(input_values=audio, n_quantizers=n) for n in (1, 4)]


ENCODERS = {"transformers EnCodec": _hf_encodec, "transformers Mimi": _hf_mimi,
            "transformers DAC": _hf_dac}


def encode_side_by_side(model, calls, backend="auto"):
    """Encode (and decode the codes) with the model and a patched copy; codes and
    reconstructions equal."""
    model, patched = _patched_pair(model, backend)
    _roundtrip_state(model, patched)
    with torch.no_grad():
        for kwargs in calls:
            want, got = model.encode(**kwargs), patched.encode(**kwargs)
            want_codes, got_codes = want.audio_codes, got.audio_codes
            assert torch.equal(got_codes, want_codes), \
                f"{int((got_codes != want_codes).sum())} codes differ ({kwargs.keys()})"
            assert_close_tree(got, want, 1e-5, 1e-4, "encode")
            extra = ({"audio_scales": want.audio_scales}
                     if type(model).__name__ == "EncodecModel" else {})
            torch.testing.assert_close(patched.decode(audio_codes=got_codes, **extra)[0],
                                       model.decode(audio_codes=want_codes, **extra)[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("target", list(ENCODERS))
def test_encode_matches_the_original(target, backend):
    model, calls = ENCODERS[target]()
    encode_side_by_side(model, calls, backend)


@pytest.mark.parametrize("which", ["xcodec.modeling_xcodec.XcodecEuclideanCodebook",
                                   "wavtokenizer.modeling_wavtokenizer.WavTokenizerEuclideanCodebook"])
def test_codebook_ports_search_as_the_original(which):
    path, cls = which.rsplit(".", 1)
    module = _import(f"transformers.models.{path}")
    book = getattr(module, cls)(types.SimpleNamespace(codebook_size=50, codebook_dim=12))
    _randomise_codebooks(book)
    book, patched = _patched_pair(book)
    h = torch.randn(3, 17, 12, generator=torch.Generator().manual_seed(2))
    want, got = book.encode(h), patched.encode(h)
    assert_codes_match(h, book.embed, got, want)
    assert got.shape == want.shape
    torch.testing.assert_close(patched.decode(got), book.decode(want))


# --- what the patch reports, refuses and undoes --------------------------------------------

def test_a_wrong_patch_fails(monkeypatch):
    """The convergence checks catch a search that is off by one code, in every target
    family: trained (notebook, diffusers, encodec) and encode-only (transformers)."""
    original = _torch.nearest_code

    def off_by_one(x, codebook, *args, **kwargs):
        idx, sqdist = original(x, codebook, *args, **kwargs)
        return (idx + 1) % codebook.shape[0], sqdist

    monkeypatch.setattr(_torch, "nearest_code", off_by_one)
    for target in TRAINED:
        model, batches, loss_of = TRAINED[target]()
        with pytest.raises(AssertionError):
            train_side_by_side(model, batches, loss_of, steps=2)
    for target in ENCODERS:
        model, calls = ENCODERS[target]()
        with pytest.raises(AssertionError):
            encode_side_by_side(model, calls)


def test_report_unpatch_and_idempotence():
    model = torch.nn.Sequential(reference.VectorQuantizerEMA(16, 4, 0.25, 0.99),
                                torch.nn.Linear(4, 4), reference.VectorQuantizer(16, 4, 0.25))
    report = vqfast.patch(model)
    assert [(name, cls) for name, cls, _ in report.patched] == [
        ("0", "VectorQuantizerEMA"), ("2", "VectorQuantizer")]
    assert "patched 0 (VectorQuantizerEMA): forward" in str(report)
    assert len(vqfast.patch(model)) == 2  # again: the same two, nothing doubled
    assert "forward" in model[0].__dict__
    assert vqfast.unpatch(model) == 2
    assert "forward" not in model[0].__dict__ and vqfast.unpatch(model) == 0


def test_unsupported_options_are_left_with_a_warning(tmp_path):
    vae = _import("diffusers.models.autoencoders.vae")
    used = tmp_path / "used.npy"
    import numpy as np
    np.save(used, np.arange(8))
    vq = vae.VectorQuantizer(16, 4, beta=0.25, remap=str(used))
    with pytest.warns(UserWarning, match="remap"):
        report = vqfast.patch(vq)
    assert len(report) == 0 and report.left[0][2].startswith("remap=")
    assert "forward" not in vq.__dict__
    assert len(vqfast.patch(vq, warn=False)) == 0


def test_libraries_select_what_is_patched():
    from vqfast.patch import LIBRARIES, _RULES, _NOTEBOOK, _package
    assert {_package(r) for r in [*_RULES.values(), *_NOTEBOOK.values()]} == set(LIBRARIES)
    assert vqfast.patch.LIBRARIES == LIBRARIES
    model = torch.nn.Sequential(reference.VectorQuantizerEMA(16, 4, 0.25, 0.99))
    assert len(vqfast.patch(model, libraries=["encodec", "moshi"])) == 0
    assert "forward" not in model[0].__dict__
    assert len(vqfast.patch(model, libraries="notebook")) == 1
    with pytest.raises(ValueError, match="unknown libraries.*known: transformers"):
        vqfast.patch(model, libraries=["transformer"])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="backend"):
        vqfast.patch(torch.nn.Linear(2, 2), backend="cuda")
    with pytest.raises(ValueError, match="precision"):
        vqfast.patch(torch.nn.Linear(2, 2), precision="fp8")
    with pytest.raises(TypeError, match="nn.Module"):
        vqfast.patch(object())


def test_a_notebook_class_of_the_users_own_is_found():
    """The notebook's classes, pasted into a user's script: found by name and attributes."""
    class VectorQuantizerEMA(reference.VectorQuantizerEMA):
        pass

    VectorQuantizerEMA.__module__ = "__main__"
    VectorQuantizerEMA.__qualname__ = "VectorQuantizerEMA"
    assert len(vqfast.patch(VectorQuantizerEMA(16, 4, 0.25, 0.99))) == 1

    class VectorQuantizer(torch.nn.Module):  # the name alone is not enough
        pass

    VectorQuantizer.__qualname__ = "VectorQuantizer"
    assert len(vqfast.patch(VectorQuantizer())) == 0


# --- export and compile of a patched encode ----------------------------------------------

class _Encode(torch.nn.Module):
    def __init__(self, quantizer, **kwargs):
        super().__init__()
        self.quantizer, self.kwargs = quantizer, kwargs

    def forward(self, h):
        return self.quantizer.encode(h, **self.kwargs)


def _encodec_quantizers():
    model, _ = _hf_encodec()
    model, patched = _patched_pair(model)
    h = torch.randn(2, model.config.codebook_dim, 30, generator=torch.Generator().manual_seed(3))
    return _Encode(model.quantizer, bandwidth=6.0), _Encode(patched.quantizer, bandwidth=6.0), h


def test_patched_encode_exports_with_equal_codes():
    """``torch.export`` keeps vqfast's search as one op per level (``vqfast::nearest_code``),
    and the exported program's codes equal the unpatched eager model's."""
    original, patched, h = _encodec_quantizers()
    program = torch.export.export(patched, (h,))
    ops = [n.target for n in program.graph.nodes if "vqfast" in str(n.target)]
    assert ops and all("nearest_code" in str(op) for op in ops)
    assert torch.equal(program.module()(h), original(h))


def _onnx_codes(module, x, tmp_path, ort):
    """``module(x)``'s codes run through ``torch.export`` with vqfast's decompositions (no
    vqfast op left in the graph), ONNX and onnxruntime."""
    program = torch.export.export(module, (x,)).run_decompositions(
        vqfast.export_decompositions())
    assert not [n for n in program.graph.nodes if "vqfast" in str(n.target)]
    torch.onnx.export(program, (x,), dynamo=True).save(str(tmp_path / "encode.onnx"))
    session = ort.InferenceSession(str(tmp_path / "encode.onnx"))
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def test_patched_encode_exports_to_onnx_with_equal_codes(tmp_path):
    """Decomposed to standard ops (``vqfast.export_decompositions``), the exported encode
    converts to ONNX, and onnxruntime's codes equal the unpatched eager model's."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    original, patched, h = _encodec_quantizers()
    assert torch.equal(_onnx_codes(patched, h, tmp_path, ort), original(h))


@pytest.mark.slow
def test_patched_encode_compiles_fullgraph_with_equal_codes():
    original, patched, h = _encodec_quantizers()
    assert torch.equal(torch.compile(patched, fullgraph=True)(h), original(h))


@pytest.mark.parametrize("option,why", [
    (dict(use_cosine_sim=True), "use_cosine_sim"),
    (dict(codebook_diversity_loss_weight=0.1), "codebook_diversity_loss_weight"),
    (dict(stochastic_sample_codes=True), "stochastic_sample_codes"),
])
def test_vector_quantize_pytorch_options_it_does_not_reproduce_are_left(option, why):
    vqp = _import("vector_quantize_pytorch")
    vq = vqp.VectorQuantize(dim=8, codebook_size=16, **option)
    with pytest.warns(UserWarning, match=why):
        report = vqfast.patch(vq)
    assert len(report) == 0 and len(report.left) == 1  # its codebook is not reported twice
    assert "forward" not in vq._codebook.__dict__


def test_a_sampler_of_its_own_is_left():
    vqp = _import("vector_quantize_pytorch")
    book = vqp.vector_quantize_pytorch.Codebook(8, 16, gumbel_sample=lambda *a, **k: None)
    with pytest.warns(UserWarning, match="gumbel_sample of its own"):
        assert len(vqfast.patch(book)) == 0


def test_modules_with_accelerate_hooks_are_left():
    """Offloaded weights (accelerate's hooks move them in around the original methods)."""
    model, _ = _hf_dac()
    model.quantizer.quantizers[1].codebook._hf_hook = object()
    with pytest.warns(UserWarning, match="accelerate"):
        report = vqfast.patch(model)
    assert [name for name, _, _ in report.left] == ["quantizer.quantizers.1"]
    assert len(report.patched) == 3


def test_a_patched_model_saved_whole_loads_patched(tmp_path):
    import io
    model, batches, _ = TRAINED["diffusers VectorQuantizer"]()
    model, patched = _patched_pair(model)
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert "forward" in loaded.__dict__ and loaded.forward.module is loaded
    x = batches(0)
    assert_close_tree(loaded(x), model(x), 1e-5, 1e-4, "loaded")


def test_empty_inputs_behave_as_the_original():
    model, _, _ = TRAINED["diffusers VectorQuantizer"]()
    model, patched = _patched_pair(model)
    for z in (torch.randn(0, 12, 5, 7), torch.randn(2, 12, 0, 7)):
        want, got = model(z), patched(z)
        assert got[0].shape == want[0].shape and got[2][2].shape == want[2][2].shape
        assert torch.equal(got[1].isnan(), want[1].isnan())


@pytest.mark.parametrize("target", ["diffusers VectorQuantizer",
                                    "moshi ResidualVectorQuantization (dead codes)"])
def test_codes_under_autocast_are_the_originals(target):
    """Under bf16 autocast the originals' cdist stays fp32; so does the patched search."""
    model, batches, _ = TRAINED[target]()
    model, patched = _patched_pair(model.eval())
    x = torch.randn(4, 12, 64, 64) if target.startswith("diffusers") else torch.randn(4, 12, 4096)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = model(x), patched(x)
    codes = lambda out: out[2][2] if isinstance(out[2], tuple) else out.codes  # noqa: E731
    assert torch.equal(codes(got), codes(want))


def test_vector_quantize_pytorch_cross_entropy_against_given_codes_runs_the_original():
    """``vq(x, indices=codes)`` reads the distance matrix: that call runs the original
    codebook, and its loss equals the unpatched module's."""
    vqp = _import("vector_quantize_pytorch")
    torch.manual_seed(0)
    vq, patched = _patched_pair(vqp.VectorQuantize(dim=8, codebook_size=16).eval())
    x = torch.randn(2, 5, 8)
    codes = torch.randint(0, 16, (2, 5))
    torch.testing.assert_close(patched(x, indices=codes)[1], vq(x, indices=codes)[1])
    assert "forward" in patched._codebook.__dict__  # patched again after the call


# --- vqfast's own encodes, exported ---------------------------------------------------------

OWN_ENCODERS = {
    "VectorQuantizerEMA": lambda: (vqfast.VectorQuantizerEMA(40, 12, backend="torch"), {}),
    "VectorQuantizer": lambda: (vqfast.VectorQuantizer(40, 12, backend="torch"), {}),
    "ResidualVQ (2 groups)": lambda: (vqfast.ResidualVQ(3, 40, 12, groups=2, backend="torch"), {}),
    "ResidualVQ (cosine, first 2 levels)": lambda: (
        vqfast.ResidualVQ(3, 40, 12, cosine=True, backend="torch"), {"num_levels": 2}),
    "FSQ": lambda: (vqfast.FSQ([8, 5, 5], dim=12, backend="torch"), {}),
    "LFQ": lambda: (vqfast.LFQ(12, backend="torch"), {}),
    "SimVQ": lambda: (vqfast.SimVQ(40, 12, backend="torch"), {}),
    "IndexBackpropVQ": lambda: (vqfast.IndexBackpropVQ(40, 12, backend="torch"), {}),
}


@pytest.mark.parametrize("name", list(OWN_ENCODERS))
def test_encode_exports_to_onnx_with_the_eager_codes(name, tmp_path):
    """Each quantizer's ``encode``: ``torch.export`` (vqfast's ops kept as single ops), then
    decomposed to standard ops (``vqfast.export_decompositions``), ONNX, onnxruntime; the
    codes equal eager's."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    quantizer, options = OWN_ENCODERS[name]()
    encoder = _Encode(quantizer.eval(), **options)
    x = torch.randn(2, 12, 5, 7)
    assert torch.equal(_onnx_codes(encoder, x, tmp_path, ort), encoder(x))
