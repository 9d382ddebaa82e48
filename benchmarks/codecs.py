"""``python -m benchmarks.codecs``: codec quantizers against ``vqfast.ResidualVQ`` built
with the codec's conventions.

Each case builds a codec's own residual quantizer from its package at the size its model
ships (random codebooks, no download), a ``vqfast.ResidualVQ`` with that codec's options
and the same state, and times side by side in one run: the encode (codes only, at each
bandwidth: the first ``n`` levels) and a training step (forward and backward of the
output and the codec's loss). Codes are checked equal before timing. Reports the median
time, the speedup and the peak memory above the inputs. Libraries that are not installed
are skipped (``pip install --no-deps encodec moshi descript-audio-codec``).

    python -m benchmarks.codecs --out benchmarks/results   # --device cuda on a GPU

The builders (``encodec_like``, ``mimi_like``, ``dac_like``) are what the codec tests
use too: they are how a codec's quantizer maps onto ``ResidualVQ``.
"""

import dataclasses

import torch

import vqfast

from .measure import median_seconds, one_call_seconds, peak_extra_bytes, timing_threads
from .patched import third_party
from .suite import model_benchmark_main, pair_table


# --- from a codec's quantizer to ResidualVQ ---------------------------------------------

def ema_state(core) -> dict:
    """The EMA state of encodec's or moshi's ``ResidualVectorQuantization``, stacked per
    level under ``ResidualVQ``'s names."""
    books = [layer._codebook for layer in core.layers]
    if hasattr(books[0], "embed_avg"):  # encodec
        names = ("embed", "embed_avg", "cluster_size")
    else:  # moshi
        names = ("embedding", "embedding_sum", "cluster_usage")
    return {ours: torch.stack([getattr(b, theirs) for b in books])
            for ours, theirs in zip(("codebooks", "ema_weight", "ema_cluster_size"), names)}


def ema_like(core, *, backend="auto", **options) -> vqfast.ResidualVQ:
    """A ``ResidualVQ`` holding ``core``'s state (encodec's or moshi's
    ``ResidualVectorQuantization``): k-means and dead-code expiry off, as a trained model's."""
    book = core.layers[0]._codebook
    levels, k, d = ema_state(core)["codebooks"].shape
    options = {"kmeans_init": False, "dead_code_threshold": 0, **options}
    ours = vqfast.ResidualVQ(levels, k, options.pop("dim", d), decay=book.decay,
                             epsilon=book.epsilon, backend=backend, **options)
    with torch.no_grad():
        for name, value in ema_state(core).items():
            getattr(ours, name).copy_(value)
    return ours


def encodec_like(core, commitment_weight=1.0, **options) -> vqfast.ResidualVQ:
    """facebook encodec's ``ResidualVectorQuantization``: raw EMA sizes, only the first
    level's commitment reaching the input."""
    return ema_like(core, commitment_cost=commitment_weight, ema_size="raw",
                    commitment_levels="first", **options)


def mimi_like(split, **options) -> list:
    """moshi's ``SplitResidualVectorQuantizer`` (Mimi's): two ``ResidualVQ``, the semantic
    level and the acoustic ones, each with moshi's EMA rule, bias-free projections and a 0
    loss in eval; their outputs add up, their losses over the levels make moshi's penalty."""
    halves = []
    for rvq in (split.rvq_first, split.rvq_rest):
        ours = ema_like(rvq.vq, commitment_cost=1.0, ema_size="raw_clamped",
                        dim=rvq.input_dimension, codebook_dim=rvq.dimension,
                        projection_bias=False, eval_loss="zero", **options)
        with torch.no_grad():
            ours.project_in.weight.copy_(rvq.input_proj.weight.squeeze(-1))
            ours.project_out.weight.copy_(rvq.output_proj.weight.squeeze(-1))
        halves.append(ours)
    return halves


def weight_normed_like(ours, theirs) -> None:
    """``ours`` (a ``vqfast.Projection``) weight-normed with ``theirs``' weights (a
    weight-normed ``Conv1d``: ``weight_g``/``weight_v``, or the same as a parametrization)."""
    torch.nn.utils.parametrizations.weight_norm(ours)
    if hasattr(theirs, "parametrizations"):
        g, v = theirs.parametrizations.weight.original0, theirs.parametrizations.weight.original1
    else:
        g, v = theirs.weight_g, theirs.weight_v
    weights = ours.parametrizations.weight
    with torch.no_grad():
        weights.original0.copy_(g.view(-1, 1))
        weights.original1.copy_(v.squeeze(-1))
        ours.bias.copy_(theirs.bias)


def dac_like(rvq, *, backend="auto", commitment_cost=0.25, **options) -> vqfast.ResidualVQ:
    """descript-audio-codec's ``ResidualVectorQuantize`` (or SNAC's, with its strides): per
    level a weight-normed projection, the code chosen by direction, the raw code out.
    ``loss`` = codebook loss + ``commitment_cost`` x commitment loss (DAC trains with 0.25)."""
    levels = rvq.quantizers
    first = levels[0]
    strides = [getattr(level, "stride", 1) for level in levels]
    if any(s > 1 for s in strides):
        options.setdefault("level_strides", tuple(strides))
    options.setdefault("cosine", "search")
    options.setdefault("level_projections", True)
    ours = vqfast.ResidualVQ(len(levels), first.codebook_size, first.in_proj.in_channels,
                             commitment_cost=commitment_cost, ema=False, kmeans_init=False,
                             codebook_dim=first.codebook_dim, backend=backend, **options)
    with torch.no_grad():
        ours.codebooks.copy_(torch.stack([level.codebook.weight for level in levels]))
    if ours.level_projections:
        for i, level in enumerate(levels):
            weight_normed_like(ours.project_in[i], level.in_proj)
            weight_normed_like(ours.project_out[i], level.out_proj)
    return ours


# --- the cases ----------------------------------------------------------------------------

def _random_ema_codebooks(core, gen):
    for layer in core.layers:  # trained codebooks, as a checkpoint brings
        book = layer._codebook
        if hasattr(book, "embed_avg"):  # encodec
            book.embed.copy_(torch.randn(book.embed.shape, generator=gen))
            book.embed_avg.copy_(book.embed)
            book.cluster_size.fill_(1.0)
            book.inited.fill_(1)
        else:  # moshi
            book.embedding_sum.copy_(torch.randn(book.embedding_sum.shape, generator=gen))
            book.cluster_usage.uniform_(0.5, 2.0, generator=gen)
            book._initialized.fill_(1)


def _encodec(levels_used, quick, device):
    core_vq = third_party("encodec.quantization.core_vq")
    if core_vq is None:
        return None
    k, d, frames = (64, 16, 40) if quick else (1024, 128, 750)  # 10 s at 75 Hz
    theirs = core_vq.ResidualVectorQuantization(num_quantizers=32, dim=d, codebook_size=k,
                                                kmeans_init=False, threshold_ema_dead_code=0)
    _random_ema_codebooks(theirs, torch.Generator().manual_seed(0))
    x = torch.randn(1, d, frames, device=device)
    ours = encodec_like(theirs).to(device)
    return dict(
        theirs=theirs.to(device), ours=ours, x=x,
        encode=(lambda m: m.encode(x, n_q=levels_used).transpose(0, 1),
                lambda m: m.encode(x, num_levels=levels_used)),
        train=(lambda m, x: _loss_step(*m(x, n_q=levels_used)[::2]),
               lambda m, x: _loss_step(*m(x, num_levels=levels_used)[1::-1])))


def _mimi(levels_used, quick, device):
    vq = third_party("moshi.quantization.vq")
    if vq is None:
        return None
    k, dim, code_dim, frames = (64, 32, 16, 20) if quick else (2048, 512, 256, 125)  # 10 s
    theirs = vq.SplitResidualVectorQuantizer(n_q=32, n_q_semantic=1, dimension=code_dim,
                                             input_dimension=dim, output_dimension=dim,
                                             bins=k, threshold_usage_ratio=0.0)
    gen = torch.Generator().manual_seed(0)
    for rvq in (theirs.rvq_first, theirs.rvq_rest):
        _random_ema_codebooks(rvq.vq, gen)
    theirs.set_num_codebooks(levels_used)
    semantic, acoustic = (half.to(device) for half in mimi_like(theirs))
    x = torch.randn(1, dim, frames, device=device)

    def ours_encode(_):
        return torch.cat([semantic.encode(x), acoustic.encode(x, num_levels=levels_used - 1)], 1)

    def ours_train(_, x):
        loss_s, q_s, _, _ = semantic(x)
        loss_a, q_a, _, _ = acoustic(x, num_levels=levels_used - 1)
        _loss_step(q_s + q_a, (loss_s + loss_a) / levels_used)

    def theirs_train(m, x):
        out = m(x, frame_rate=12)
        _loss_step(out.x, out.penalty)
    return dict(theirs=theirs.to(device), ours=torch.nn.ModuleList([semantic, acoustic]), x=x,
                encode=(lambda m: m.encode(x), ours_encode), train=(theirs_train, ours_train))


def _dac(quick, device):
    quantize = third_party("dac.nn.quantize")
    if quantize is None:
        return None
    dim, k, frames = (64, 64, 40) if quick else (1024, 1024, 862)  # 44 kHz: 10 s at 86 Hz
    torch.manual_seed(0)
    theirs = quantize.ResidualVectorQuantize(input_dim=dim, n_codebooks=9, codebook_size=k,
                                             codebook_dim=8)
    ours = dac_like(theirs).to(device)
    x = torch.randn(1, dim, frames, device=device)

    def theirs_train(m, x):
        q, _, _, commitment, codebook = m(x)
        _loss_step(q, codebook + 0.25 * commitment)
    return dict(theirs=theirs.to(device), ours=ours, x=x,
                encode=(lambda m: m(x)[1], lambda m: m.encode(x)),
                train=(theirs_train, lambda m, x: _loss_step(*m(x)[1::-1])))


def _loss_step(out, loss):
    (out.pow(2).mean() + loss.sum()).backward()


CASES = [
    ("EnCodec 32x1024 D=128 at 1.5 kbps (2 levels)", lambda q, d: _encodec(2, q, d)),
    ("EnCodec 32x1024 D=128 at 24 kbps (32 levels)", lambda q, d: _encodec(32, q, d)),
    ("Mimi 2048 codes, 1 semantic + 7 acoustic levels", lambda q, d: _mimi(8, q, d)),
    ("Mimi 2048 codes, 1 semantic + 31 acoustic levels", lambda q, d: _mimi(32, q, d)),
    ("DAC 44 kHz: 9x1024, projections 1024 -> 8", _dac),
]


@dataclasses.dataclass
class Row:
    case: str
    kind: str  # encode (eval, codes only) or train (forward + backward)
    codes_equal: bool | None = None
    original_ms: float | None = None
    vqfast_ms: float | None = None
    original_peak_mib: float | None = None
    vqfast_peak_mib: float | None = None
    speedup: float | None = None
    skipped: str | None = None


def run(quick: bool = False, device=torch.device("cpu"), progress=print):
    rows = []
    with timing_threads(device):
        for name, build in CASES:
            made = build(quick, device)
            for kind in ("encode", "train"):
                row = Row(name, kind)
                rows.append(row)
                if made is None:
                    row.skipped = "library not installed"
                    continue
                theirs_fn, ours_fn = made[kind]
                modules = (made["theirs"], made["ours"])
                if kind == "encode":
                    for m in modules:
                        m.eval()
                    with torch.no_grad():
                        row.codes_equal = torch.equal(theirs_fn(modules[0]), ours_fn(modules[1]))
                    calls = [lambda f=f, m=m: _no_grad(f, m) for f, m in zip(made[kind], modules)]
                else:
                    for m in modules:
                        m.train()
                    x = made["x"]
                    calls = [lambda f=f, m=m: f(m, x.detach().requires_grad_())
                             for f, m in zip(made[kind], modules)]
                for label, call in zip(("original", "vqfast"), calls):
                    timed = one_call_seconds if quick else median_seconds
                    setattr(row, f"{label}_ms", timed(call, device) * 1e3)
                    setattr(row, f"{label}_peak_mib", peak_extra_bytes(call, device) / 2**20)
                row.speedup = row.original_ms / row.vqfast_ms
                progress(f"{name} {kind}: {row.original_ms:.2f} ms -> {row.vqfast_ms:.2f} ms "
                         f"({row.speedup:.2f}x)"
                         + (f", codes equal: {row.codes_equal}" if kind == "encode" else ""))
    return rows


def _no_grad(fn, module):
    with torch.no_grad():
        return fn(module)


def markdown(env: dict, rows) -> str:
    return pair_table(env, rows, [("case", lambda r: r.case), ("step", lambda r: r.kind)],
                      "vqfast", "Codec quantizers and `vqfast.ResidualVQ` with their "
                      "conventions; each pair timed side by side in one run (median), peak "
                      "memory above the inputs. encode: eval, codes only; train: forward and "
                      "backward of the output and the codec's loss.")


def main(argv=None):
    model_benchmark_main("benchmarks.codecs", __doc__, "codecs",
                         "Codec quantizers and vqfast.ResidualVQ", run, markdown, argv)


if __name__ == "__main__":
    main()
