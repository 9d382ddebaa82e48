"""``python -m benchmarks.patched``: models others wrote, with and without ``vqfast.patch``.

Each case builds a quantizer from its library at the size its model ships (random weights
and codebooks, no download), times the call the model makes (a codec's encode, a training
step's forward and backward) on the original and on a patched copy side by side, and
reports the median time, the speedup and the peak memory of each. The codes are checked
equal before timing. Libraries that are not installed are skipped (``pip install -e
".[dev,models]"``; facebook's encodec: ``pip install --no-deps encodec``).

    python -m benchmarks.patched --out benchmarks/results   # --device cuda on a GPU
"""

import copy
import dataclasses
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch

import vqfast

from .measure import median_seconds, one_call_seconds, peak_extra_bytes, timing_threads
from .suite import model_benchmark_main, pair_table

ROOT = Path(__file__).resolve().parents[1]


def _dac_quantizer_modules():
    """descript-audio-codec's quantizer modules without its package ``__init__`` (which
    imports audiotools, and through it torchaudio, for audio files: the quantizer needs
    neither); ``None`` when the package is not installed."""
    if "dac.nn.quantize" in sys.modules:
        return sys.modules["dac.nn.quantize"]
    spec = importlib.util.find_spec("dac")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    stubs = {}
    for name, path in (("dac", root), ("dac.nn", root / "nn")):
        if name not in sys.modules:
            stubs[name] = types.ModuleType(name)
            stubs[name].__path__ = [str(path)]
            sys.modules[name] = stubs[name]
    try:
        return importlib.import_module("dac.nn.quantize")
    finally:
        for name in stubs:  # the stand-in packages only while their modules import
            del sys.modules[name]


def third_party(name: str):
    """A third-party module, imported with the repository root off ``sys.path`` (its
    ``kernels/`` folder would answer transformers' and diffusers' probe for a package of
    that name); ``None`` when the library is not installed."""
    stand_in = name.startswith("encodec") and importlib.util.find_spec("torchaudio") is None
    # (encodec imports torchaudio for audio files only; its quantizer never uses it)
    if name.startswith("dac."):
        return _dac_quantizer_modules()
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    try:
        if importlib.util.find_spec("transformers") is not None:
            # its hub-kernel integration imports a package named `kernels`: imported here,
            # off the root, it is the real one (a lazy import later would take ours)
            importlib.import_module("transformers.integrations.hub_kernels")
        if stand_in:
            sys.modules["torchaudio"] = types.ModuleType("torchaudio")
        return importlib.import_module(name)
    except ImportError:
        return None
    finally:
        sys.path[:] = saved
        if stand_in:  # only while encodec imports (other libraries probe for torchaudio)
            del sys.modules["torchaudio"]


def random_codebooks(module, gen):
    """Random codebooks in every EMA codebook of ``module`` (``embed``/``embed_sum``
    buffers; Mimi's usage too), as a checkpoint would bring: the ports initialise them to
    zeros, where every code ties."""
    for m in module.modules():
        for name in ("embed", "embed_sum"):
            if name in m._buffers:
                m._buffers[name].copy_(torch.randn(m._buffers[name].shape, generator=gen))
        if "cluster_usage" in m._buffers:
            m.cluster_usage.uniform_(0.5, 2.0, generator=gen)
            m._embed = None
    return module


# --- the cases: (name, what is timed, builder -> (module, call(module) -> codes)) ------------

def _hf_codec_quantizer(model, config, quantizer, channels, frames, quick, device, call):
    """A transformers codec's quantizer at its shipped size (``quick``: 64 codes) with
    random codebooks, and ``frames`` input frames of ``channels`` for ``call``."""
    hf = third_party(f"transformers.models.{model}.modeling_{model}")
    if hf is None:
        return None
    cfg = getattr(importlib.import_module("transformers"), config)()
    if quick:
        cfg.codebook_size = 64
    gen = torch.Generator().manual_seed(0)
    module = random_codebooks(getattr(hf, quantizer)(cfg), gen)
    h = torch.randn(1, getattr(cfg, channels), frames, generator=gen).to(device)
    return module.to(device), lambda q: call(q, h)


def _hf_encodec(bandwidth, quick, device):  # 10 s at 75 Hz
    return _hf_codec_quantizer("encodec", "EncodecConfig", "EncodecResidualVectorQuantizer",
                               "codebook_dim", 40 if quick else 750, quick, device,
                               lambda q, h: q.encode(h, bandwidth=bandwidth))


def _hf_mimi(levels, quick, device):  # 10 s at 12.5 Hz
    return _hf_codec_quantizer("mimi", "MimiConfig", "MimiSplitResidualVectorQuantizer",
                               "hidden_size", 20 if quick else 125, quick, device,
                               lambda q, h: q.encode(h, num_quantizers=levels))


def _hf_dac(quick, device):
    hf = third_party("transformers.models.dac.modeling_dac")
    if hf is None:
        return None
    cfg = importlib.import_module("transformers").DacConfig()  # 44 kHz: 9 levels, 1024 codes
    if quick:
        cfg.codebook_size = 64
    torch.manual_seed(0)
    quantizer = hf.DacResidualVectorQuantizer(cfg).eval()
    h = torch.randn(1, cfg.hidden_size, 40 if quick else 862, device=device)  # 10 s at 86 Hz
    return quantizer.to(device), lambda q: q(h)[1]


def _diffusers_step(k, d, quick, device):
    vae = third_party("diffusers.models.autoencoders.vae")
    if vae is None:
        return None
    if quick:
        k = 64
    torch.manual_seed(0)
    vq = vae.VectorQuantizer(k, d, beta=0.25)
    vq.embedding.weight.data.normal_()
    z = torch.randn(4, d, 4 if quick else 16, 4 if quick else 16, device=device,
                    requires_grad=True)
    grad = torch.randn_like(z)

    def step(q):
        out, loss, (_, _, idx) = q(z)
        torch.autograd.backward((out, loss), (grad, torch.ones_like(loss)))
        return idx
    return vq.to(device), step


def _vqmodel_step(quick, device):
    vq_model = third_party("diffusers.models.autoencoders.vq_model")
    if vq_model is None:
        return None
    torch.manual_seed(0)
    blocks = 1 if quick else 2
    model = vq_model.VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(32, 64)[:blocks],
        layers_per_block=1, latent_channels=4, num_vq_embeddings=64 if quick else 8192,
        vq_embed_dim=4, norm_num_groups=8)  # a VQ-f2 autoencoder with an 8192-code book
    model.quantize.embedding.weight.data.normal_()
    images = torch.randn(4, 3, 16 if quick else 64, 16 if quick else 64, device=device)

    def step(m):
        out = m(images, return_dict=True)
        ((out.sample - images).pow(2).mean() + out.commit_loss.sum()).backward()
        return m.quantize(m.quant_conv(m.encoder(images)))[2][2]
    return model.to(device), step


def _hf_encodec_model(quick, device):
    hf = third_party("transformers.models.encodec.modeling_encodec")
    if hf is None:
        return None
    cfg = importlib.import_module("transformers").EncodecConfig()  # the 24 kHz model
    if quick:
        cfg.codebook_size, cfg.num_filters, cfg.hidden_size, cfg.codebook_dim = 64, 4, 16, 16
    torch.manual_seed(0)
    model = random_codebooks(hf.EncodecModel(cfg).eval(), torch.Generator().manual_seed(0))
    audio = torch.randn(1, 1, 3200 if quick else 24000, device=device)  # 1 s
    return model.to(device), lambda m: m.encode(audio, bandwidth=24.0).audio_codes


def _encodec_step(quick, device):
    core_vq = third_party("encodec.quantization.core_vq")
    if core_vq is None:
        return None
    torch.manual_seed(0)
    k, d = (64, 16) if quick else (1024, 128)
    rvq = core_vq.ResidualVectorQuantization(num_quantizers=8, dim=d, codebook_size=k,
                                             kmeans_init=False, threshold_ema_dead_code=0).train()
    for layer in rvq.layers:  # trained codebooks, as a checkpoint brings
        layer._codebook.embed.normal_()
        layer._codebook.embed_avg.copy_(layer._codebook.embed)
        layer._codebook.cluster_size.fill_(1.0)
    x = torch.randn(4, d, 20 if quick else 150, device=device, requires_grad=True)

    def step(q):
        out, codes, losses = q(x)
        (out.pow(2).mean() + losses.sum()).backward()
        return codes
    return rvq.to(device), step


def _vqp_step(levels, quick, device):
    vqp = third_party("vector_quantize_pytorch")
    if vqp is None:
        return None
    torch.manual_seed(0)
    k, d = (64, 16) if quick else (1024, 256 if levels == 1 else 128)
    vq = (vqp.VectorQuantize(dim=d, codebook_size=k, threshold_ema_dead_code=0) if levels == 1
          else vqp.ResidualVQ(dim=d, codebook_size=k, num_quantizers=levels,
                              threshold_ema_dead_code=0))
    with torch.no_grad():  # trained codebooks, as a checkpoint brings
        for m in vq.modules():
            if "embed" in m._buffers:
                m.embed.normal_()
                m.embed_avg.copy_(m.embed)
    x = torch.randn(4, 16 if quick else 1024, d, device=device, requires_grad=True)

    def step(q):
        out, codes, loss = q(x)
        (out.pow(2).mean() + loss.sum()).backward()
        return codes
    return vq.to(device), step


def _notebook_step(quick, device):
    from vqfast import reference
    torch.manual_seed(0)
    k = 64 if quick else 512
    vq = reference.VectorQuantizerEMA(k, 64, 0.25, 0.99)
    x = torch.randn(8 if quick else 64, 64, 8, 8, device=device, requires_grad=True)

    def step(q):
        loss, out, _, encodings = q(x)
        (loss + out.pow(2).mean()).backward()
        return encodings.argmax(1)
    return vq.to(device), step


CASES = [
    ("transformers EnCodec 24 kHz: encode at 1.5 kbps (2 of 32 levels)", "encode",
     lambda quick, device: _hf_encodec(1.5, quick, device)),
    ("transformers EnCodec 24 kHz: encode at 24 kbps (32 levels)", "encode",
     lambda quick, device: _hf_encodec(24.0, quick, device)),
    ("transformers Mimi: encode 8 levels (1 semantic + 7)", "encode",
     lambda quick, device: _hf_mimi(8, quick, device)),
    ("transformers Mimi: encode 32 levels", "encode", lambda quick, device: _hf_mimi(32, quick, device)),
    ("transformers DAC 44 kHz: quantize 9 levels", "encode", _hf_dac),
    ("transformers EnCodec 24 kHz whole model: encode 1 s at 24 kbps", "encode",
     _hf_encodec_model),
    ("diffusers VectorQuantizer K=1024 D=256: training step", "train",
     lambda quick, device: _diffusers_step(1024, 256, quick, device)),
    ("diffusers VectorQuantizer K=16384 D=4: training step", "train",
     lambda quick, device: _diffusers_step(16384, 4, quick, device)),
    ("diffusers VQModel whole model (64x64, 8192 codes): training step", "train",
     _vqmodel_step),
    ("encodec RVQ 8x1024 D=128: training step", "train", _encodec_step),
    ("vector-quantize-pytorch VectorQuantize K=1024 D=256: training step", "train",
     lambda quick, device: _vqp_step(1, quick, device)),
    ("vector-quantize-pytorch ResidualVQ 8x1024 D=128: training step", "train",
     lambda quick, device: _vqp_step(8, quick, device)),
    ("VQ-VAE notebook VectorQuantizerEMA K=512: training step", "train", _notebook_step),
]


@dataclasses.dataclass
class Row:
    case: str
    kind: str
    patched_modules: int | None = None
    codes_equal: bool | None = None
    original_ms: float | None = None
    patched_ms: float | None = None
    original_peak_mib: float | None = None
    patched_peak_mib: float | None = None
    speedup: float | None = None
    skipped: str | None = None


def run(quick: bool = False, device=torch.device("cpu"), progress=print):
    rows = []
    with timing_threads(device):
        for name, kind, build in CASES:
            row = Row(name, kind)
            rows.append(row)
            made = build(quick, device)
            if made is None:
                row.skipped = "library not installed"
                progress(f"{name}: skipped ({row.skipped})")
                continue
            module, call = made
            patched = copy.deepcopy(module)
            row.patched_modules = len(vqfast.patch(patched))
            # the same codes before anything is timed (training steps: the first step's)
            row.codes_equal = torch.equal(call(copy.deepcopy(module)), call(copy.deepcopy(patched)))
            for label, m in (("original", module), ("patched", patched)):
                timed = one_call_seconds if quick else median_seconds
                setattr(row, f"{label}_ms", timed(lambda m=m: call(m), device) * 1e3)
                setattr(row, f"{label}_peak_mib",
                        peak_extra_bytes(lambda m=m: call(m), device) / 2**20)
            row.speedup = row.original_ms / row.patched_ms
            progress(f"{name}: {row.original_ms:.2f} ms -> {row.patched_ms:.2f} ms "
                     f"({row.speedup:.2f}x), codes equal: {row.codes_equal}")
    return rows


def markdown(env: dict, rows) -> str:
    return pair_table(env, rows, [("case", lambda r: r.case)], "patched",
                      "Models with and without `vqfast.patch`; each pair timed side by side "
                      "in one run (median), peak memory above the inputs.")


def main(argv=None):
    model_benchmark_main("benchmarks.patched", __doc__, "patched",
                         "Models with and without vqfast.patch", run, markdown, argv)


if __name__ == "__main__":
    main()
