"""``python -m benchmarks.quality``: does a VQ-VAE trained with vqfast learn well on real images?

Trains the original notebook's VQ-VAE on 32x32 crops of the colour photographs that ship
inside pip packages (scikit-image's ``skimage.data``; scikit-learn's sample images when
installed), no download. Train and test come from different regions of each photo (the left 80% of
its width vs the right 20%), so test crops were never seen. Every configuration gets the
same model initialisation, the same batches in the same order and the same seeds:

- ``original``: the original algorithm (``vqfast.reference``, the notebook's EMA quantizer);
- ``vqfast-original-args``: ``VectorQuantizerEMA(..., **vqfast.ORIGINAL_ALGORITHM)``, the
  same algorithm through vqfast;
- ``vqfast``: ``VectorQuantizerEMA`` with its defaults;
- ``plain``: ``VectorQuantizer`` (learned codebook, the paper's non-EMA variant), defaults;
- ``residual``: ``ResidualVQ`` with 4 levels of the same codebook size, defaults;
- ``vector-quantize-pytorch``: its ``VectorQuantize`` (EMA, same decay and commitment);
- ``vector-quantize-pytorch-residual``: its ``ResidualVQ`` (4 levels, same settings);
- ``multiscale`` / ``multiscale-ema``: ``MultiScaleResidualVQ`` (VAR's) at scales 1, 2, 4,
  8 with its defaults, learned codebook (VAR's) or EMA; its codes of every scale count
  as one level (85 tokens per crop where the others have 64 per level).

Reports NMSE as the original does (MSE / variance of the training pixels) on train and
test (mean ± std and median over seeds), the runs that collapsed (test crops using at
most 2% of the codes, on any level), perplexity, codes used, dead codes (never chosen in
the last 100 steps) and seconds per step; residual configurations report the mean over
levels. Writes JSON, a plot of the curves and a grid of test reconstructions. ``--quick``
checks the pipeline in seconds (tiny model, few steps).
"""

import argparse
import dataclasses
import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import vqfast
from vqfast import reference

CROP = 32
CONFIGS = ("original", "vqfast-original-args", "vqfast", "plain", "residual",
           "vector-quantize-pytorch", "vector-quantize-pytorch-residual", "multiscale",
           "multiscale-ema")
RESIDUAL_LEVELS = 4
SCALES = (1, 2, 4, 8)  # VAR's multi-scale quantizer on the 8 x 8 latents of 32 x 32 crops
COLLAPSED = 0.02  # a run whose test crops use at most this fraction of the codes


# --- data -------------------------------------------------------------------------------

def photographs():
    """``{name: uint8 [H, W, 3]}``: the colour photographs shipped with scikit-image (and
    scikit-learn's two sample images when it is installed)."""
    from skimage import data
    photos = {name: getattr(data, name)() for name in (
        "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
        "retina")}
    photos["motorcycle"] = data.stereo_motorcycle()[0]
    try:
        from sklearn.datasets import load_sample_images
        for name, image in zip(("china", "flower"), load_sample_images().images):
            photos[name] = image
    except ImportError:
        pass
    return photos


@dataclasses.dataclass
class Crops:
    """Train regions (for random crops) and the fixed test tiles, pixels in [-0.5, 0.5]."""
    train_regions: list  # fp32 [3, H, W_train] per photo
    test: torch.Tensor   # fp32 [n, 3, 32, 32]
    variance: float      # of the training pixels (the NMSE denominator)
    names: list


def channels_first(image: np.ndarray) -> torch.Tensor:
    """A photograph ``uint8 [H, W, 3+]`` as ``uint8 [3, H, W]`` (an alpha channel dropped)."""
    return torch.from_numpy(np.array(image[..., :3])).permute(2, 0, 1)  # a writable copy


def tiles(x: torch.Tensor, stride: int = CROP) -> torch.Tensor:
    """Every ``CROP x CROP`` window of ``x [3, H, W]`` that fits, ``stride`` apart, row by
    row: ``[n, 3, CROP, CROP]`` in ``x``'s dtype."""
    return (x.unfold(1, CROP, stride).unfold(2, CROP, stride)
            .permute(1, 2, 0, 3, 4).reshape(-1, x.shape[0], CROP, CROP))


def load_crops(train_fraction: float = 0.8) -> Crops:
    regions, test_tiles, names = [], [], []
    for name, image in photographs().items():
        x = channels_first(image).float() / 255 - 0.5
        split = int(x.shape[2] * train_fraction) // CROP * CROP
        regions.append(x[:, :, :split])
        test_tiles.append(tiles(x[:, :, split:]))
        names.append(name)
    variance = float(torch.cat([r.reshape(3, -1) for r in regions], 1).var())
    return Crops(regions, torch.cat(test_tiles), variance, names)


def batches(crops: Crops, batch_size: int, steps: int, seed: int):
    """The same random training crops, in the same order, for every configuration."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([r.shape[1] * r.shape[2] for r in crops.train_regions], dtype=torch.float)
    for _ in range(steps):
        which = torch.multinomial(sizes, batch_size, replacement=True, generator=g)
        out = torch.empty(batch_size, 3, CROP, CROP)
        for i, w in enumerate(which.tolist()):
            region = crops.train_regions[w]
            top = int(torch.randint(region.shape[1] - CROP + 1, (1,), generator=g))
            left = int(torch.randint(region.shape[2] - CROP + 1, (1,), generator=g))
            out[i] = region[:, top:top + CROP, left:left + CROP]
        yield out


# --- configurations ---------------------------------------------------------------------

class VQPAdapter(nn.Module):
    """vector-quantize-pytorch's VectorQuantize (or ResidualVQ, ``levels`` given) behind
    vqfast's 4-tuple; residual codes in vqfast's layout ``[B, Q, H, W]``."""

    def __init__(self, k, d, levels=None):
        super().__init__()
        import vector_quantize_pytorch as vqp
        self.k, self.levels = k, levels
        options = dict(dim=d, codebook_size=k, decay=0.99, eps=1e-5, commitment_weight=0.25)
        self.vq = (vqp.VectorQuantize(**options, accept_image_fmap=True) if levels is None
                   else vqp.ResidualVQ(num_quantizers=levels, **options))

    def forward(self, z):
        if self.levels is None:
            quantized, codes, loss = self.vq(z)
        else:  # its ResidualVQ takes tokens [B, N, D]
            b, d, h, w = z.shape
            quantized, codes, loss = self.vq(z.flatten(2).transpose(1, 2))
            quantized = quantized.transpose(1, 2).reshape(b, d, h, w)
            codes = codes.transpose(1, 2).reshape(b, -1, h, w)
        return loss.sum(), quantized, vqfast.functional.perplexity(
            torch.bincount(codes.reshape(-1), minlength=self.k)), codes


def build(config: str, args, seed: int) -> vqfast.VQVAE:
    """The original notebook's VQ-VAE with ``config``'s quantizer; the same init for every config."""
    torch.manual_seed(seed)
    decay = 0.0 if config in ("plain", "multiscale") else 0.99
    options = (vqfast.ORIGINAL_ALGORITHM if config in ("original", "vqfast-original-args")
               else dict(num_quantizers=RESIDUAL_LEVELS) if config == "residual"
               else dict(scales=SCALES) if config.startswith("multiscale") else {})
    model = vqfast.VQVAE(args.num_hiddens, 2, args.num_residual_hiddens, args.num_embeddings,
                         args.embedding_dim, 0.25, decay, backend=args.backend, **options)
    if config == "original":
        original = reference.VectorQuantizerEMA(args.num_embeddings, args.embedding_dim, 0.25, 0.99)
        original.load_state_dict({"_embedding.weight": model.vq.codebook,
                                  "_ema_w": model.vq.ema_weight,
                                  "_ema_cluster_size": model.vq.ema_cluster_size})
        model.vq = original
    elif config.startswith("vector-quantize-pytorch"):
        model.vq = VQPAdapter(args.num_embeddings, args.embedding_dim,
                              RESIDUAL_LEVELS if config.endswith("residual") else None)
    return model


def _codes(out) -> torch.Tensor:
    """``[M, L]``: each vector's code on each of the L levels (1 for a plain quantizer)."""
    codes = out[3]
    if codes.dim() == 2 and codes.dtype != torch.int64:  # one-hot
        return codes.argmax(1)[:, None]
    if codes.dim() == 4:  # residual [B, Q, H, W]
        return codes.movedim(1, -1).reshape(-1, codes.shape[1])
    return codes.reshape(-1, 1)


def _used(codes: torch.Tensor) -> list:
    """Distinct codes per level of ``[M, L]`` codes."""
    return [int(level.unique().numel()) for level in codes.T]


# --- one run ----------------------------------------------------------------------------

def train_one(config: str, crops: Crops, args, seed: int, device: torch.device, deadline=None):
    model = build(config, args, seed).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    curve, recent = [], []
    start = time.perf_counter()
    step = 0
    model.train()
    for step, x in enumerate(batches(crops, args.batch_size, args.steps, seed + 1000), 1):
        x = x.to(device)
        z = model.pre_vq_conv(model.encoder(x))
        out = model.vq(z)
        recon = model.decoder(out[1])
        nmse = F.mse_loss(recon, x) / crops.variance
        (nmse + out[0]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent.append(_codes(out).detach())
        recent = recent[-100:]
        out_of_time = deadline is not None and time.perf_counter() > deadline
        if step % args.log_every == 0 or step == args.steps or out_of_time:
            curve.append({"step": step, "nmse": float(nmse.detach()),
                          "perplexity": float(out[2].detach().float().mean()),
                          "codes_used_100": float(np.mean(_used(torch.cat(recent))))})
        if out_of_time:
            break
    seconds = time.perf_counter() - start
    test_nmse, test_codes = evaluate(model, crops, device)
    last = curve[-max(1, len(curve) // 10):]
    used = float(np.mean(_used(torch.cat(recent))))
    used_test = _used(test_codes)
    k = args.num_embeddings
    return {
        "config": config, "seed": seed, "steps": step, "seconds_per_step": seconds / max(step, 1),
        "train_nmse": float(np.mean([c["nmse"] for c in last])),
        "train_perplexity": float(np.mean([c["perplexity"] for c in last])),
        "test_nmse": test_nmse,
        "test_perplexity": float(np.mean([float(vqfast.functional.perplexity(
            torch.bincount(level, minlength=k))) for level in test_codes.T])),
        "codes_used_test": float(np.mean(used_test)), "codes_used_test_per_level": used_test,
        "collapsed": min(used_test) <= COLLAPSED * k,
        "codes_used_last_100_steps": used, "dead_codes": k - used,
        "curve": curve,
    }, model


@torch.no_grad()
def evaluate(model, crops: Crops, device, batch_size: int = 256):
    model.eval()
    total, count, codes = 0.0, 0, []
    for i in range(0, len(crops.test), batch_size):
        x = crops.test[i:i + batch_size].to(device)
        z = model.pre_vq_conv(model.encoder(x))
        out = model.vq(z)
        total += float(F.mse_loss(model.decoder(out[1]), x, reduction="sum"))
        count += x.numel()
        codes.append(_codes(out).cpu())
    model.train()
    return total / count / crops.variance, torch.cat(codes)


# --- the benchmark ----------------------------------------------------------------------

def summarize(runs):
    """Mean, spread (sample std) and median over seeds, and the collapsed runs, per
    configuration."""
    table = {}
    for config in dict.fromkeys(r["config"] for r in runs):
        rows = [r for r in runs if r["config"] == config]
        entry = {"seeds": len(rows), "collapsed": sum(bool(r["collapsed"]) for r in rows)}
        for key in ("train_nmse", "test_nmse", "train_perplexity", "test_perplexity",
                    "codes_used_test", "dead_codes", "seconds_per_step"):
            values = np.array([r[key] for r in rows], dtype=float)
            entry[key] = {"mean": float(values.mean()),
                          "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                          "median": float(np.median(values))}
        table[config] = entry
    return table


def markdown(summary, meta) -> str:
    lines = [f"{meta['model']}, batch {meta['batch_size']}, {meta['steps']} steps, Adam "
             f"{meta['lr']}, seeds {meta['seeds']}, {meta['device']}; crops of "
             f"{', '.join(meta['photos'])} ({meta['train_regions']} train regions, "
             f"{meta['test_crops']} test crops).", "",
             "| configuration | test NMSE | test NMSE median | collapsed runs | train NMSE | perplexity train / test | codes used (test) | dead codes | s/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for config, e in summary.items():
        f = lambda key, spec=".4f": f"{e[key]['mean']:{spec}} ± {e[key]['std']:{spec}}"  # noqa: E731
        lines.append(f"| {config} | {f('test_nmse')} | {e['test_nmse']['median']:.4f} | "
                     f"{e['collapsed']} / {e['seeds']} | {f('train_nmse')} | "
                     f"{e['train_perplexity']['mean']:.0f} / {e['test_perplexity']['mean']:.0f} | "
                     f"{f('codes_used_test', '.0f')} | {f('dead_codes', '.0f')} | "
                     f"{e['seconds_per_step']['mean']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(runs, models, crops, path_curves: Path, path_grid: Path, device) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    configs = list(dict.fromkeys(r["config"] for r in runs))
    colors = dict(zip(CONFIGS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    for r in runs:
        steps = [c["step"] for c in r["curve"]]
        label = r["config"] if r["seed"] == runs[0]["seed"] else None
        for ax, key in zip(axes, ("nmse", "perplexity", "codes_used_100")):
            ax.plot(steps, [c[key] for c in r["curve"]], color=colors[r["config"]], alpha=0.7,
                    lw=1, label=label)
    for ax, title in zip(axes, ("train NMSE", "perplexity", "codes used in the last 100 steps")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_curves, dpi=110)
    plt.close(fig)

    x = crops.test[torch.linspace(0, len(crops.test) - 1, 8).long()]
    rows = [x]
    with torch.no_grad():
        for config in configs:
            model = models[config].eval()
            z = model.pre_vq_conv(model.encoder(x.to(device)))
            rows.append(model.decoder(model.vq(z)[1]).cpu())
    fig, axes = plt.subplots(len(rows), 8, figsize=(8 * 1.2, len(rows) * 1.3))
    for i, (row, label) in enumerate(zip(rows, ["test crops"] + configs)):
        for j in range(8):
            axes[i, j].imshow((row[j] + 0.5).clamp(0, 1).permute(1, 2, 0).numpy())
            axes[i, j].axis("off")
        axes[i, 0].set_title(label, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path_grid, dpi=110)
    plt.close(fig)


def run(args, device, progress=print, deadline_s=None, partial=None):
    """Every configuration x seed; returns (report dict, {config: last model}).
    ``partial(runs)``, if given, is called after every run (to save what is done so far)."""
    crops = load_crops()
    configs = [c for c in args.configs]
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError:
        configs = [c for c in configs if not c.startswith("vector-quantize-pytorch")]
        progress("vector-quantize-pytorch not installed: its configurations are left out")
    runs, models = [], {}
    per_run = deadline_s / (len(configs) * len(args.seeds)) if deadline_s else None
    for seed in args.seeds:
        for config in configs:
            deadline = time.perf_counter() + per_run if per_run else None
            result, model = train_one(config, crops, args, seed, device, deadline)
            runs.append(result)
            models[config] = model
            if partial is not None:
                partial(runs)
            progress(f"{config:>24} seed {seed}: test NMSE {result['test_nmse']:.4f}, perplexity "
                     f"{result['train_perplexity']:.0f}, codes used {result['codes_used_test']}, "
                     f"{result['steps']} steps, {result['seconds_per_step']:.3f} s/step")
    meta = {
        "model": f"VQVAE({args.num_hiddens}, 2, {args.num_residual_hiddens}, "
                 f"{args.num_embeddings}, {args.embedding_dim})",
        "batch_size": args.batch_size, "steps": args.steps, "lr": args.lr, "seeds": args.seeds,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "vqfast": vqfast.__version__,
        "date": datetime.date.today().isoformat(), "photos": crops.names,
        "train_regions": len(crops.train_regions), "test_crops": len(crops.test),
        "data_variance": crops.variance,
    }
    summary = summarize(runs)
    return {"meta": meta, "summary": summary, "runs": runs}, models, crops


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: the pipeline only")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--num-hiddens", type=int, default=64)
    p.add_argument("--num-residual-hiddens", type=int, default=32)
    p.add_argument("--num-embeddings", type=int, default=512)
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("benchmark-results"),
                   help="output folder (default ./benchmark-results, git-ignored)")
    p.add_argument("--name", default=None, help="file name stem (default: date-device-quality)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.seeds, args.log_every = 30, 16, [0], 5
        args.num_hiddens, args.num_residual_hiddens = 16, 8
        args.num_embeddings, args.embedding_dim = 32, 8
    return args


def main(argv=None):
    args = parse_args(argv)
    device = (torch.device("cuda" if torch.cuda.is_available() else "cpu")
              if args.device == "auto" else torch.device(args.device))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (args.name or f"{datetime.date.today().isoformat()}-{device.type}-quality"
                       + ("-quick" if args.quick else ""))

    def save_partial(runs):  # a long run cut short still leaves its finished runs
        stem.with_suffix(".json").write_text(json.dumps(
            {"partial": True, "summary": summarize(runs), "runs": runs}, indent=1))
    report, models, crops = run(args, device, partial=save_partial)
    table = markdown(report["summary"], report["meta"])
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(table)
    plot(report["runs"], models, crops, Path(f"{stem}-curves.png"), Path(f"{stem}-grid.png"), device)
    print()
    print(table)
    print(f"wrote {stem}.json, .md, -curves.png, -grid.png")


if __name__ == "__main__":
    main()
