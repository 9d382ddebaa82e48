"""Train the VQ-VAE of van den Oord et al. on CIFAR-10 with vqfast (the seed notebook, done right).

Defaults are the paper's / the seed's: batch 256, 200,000 updates, Adam lr 1e-4,
hiddens 128 / residual hiddens 32 / 2 residual layers, D = 64, K = 512, commitment 0.25,
EMA decay 0.99 (``--decay 0`` is the seed's plain quantizer). The seed reached
NMSE 0.053 and perplexity ~254 at 200k steps. The quantizer takes vqfast's defaults,
k-means init and dead-code re-seeding, which keep the codebook in use;
``--original-algorithm`` turns both off (the paper's algorithm).

    python examples/train_cifar10.py --out runs/cifar10
    torchrun --nproc_per_node=8 examples/train_cifar10.py --out runs/cifar10
    python examples/train_cifar10.py --out runs/cifar10 --resume
    python examples/train_cifar10.py --plots-only runs/cifar10

Writes to ``--out``: ``metrics.jsonl`` (every ``--log-every`` steps), ``steps.csv``
(per-step NMSE and perplexity), ``checkpoint.pt`` (every ``--checkpoint-every`` steps and
at the end), ``final.json`` (test-set NMSE) and the seed's figures as PNGs.
"""

import argparse
import copy
import csv
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import vqfast

CIFAR_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]


# --- data -------------------------------------------------------------------------------

class DataNotFound(RuntimeError):
    pass


def find_cifar(data_dir: Path) -> Path:
    """The ``cifar-10-batches-py`` folder: ``data_dir`` itself or its child."""
    for candidate in (data_dir, data_dir / CIFAR_FOLDER):
        if all((candidate / name).is_file() for name in TRAIN_FILES + TEST_FILES):
            return candidate
    raise DataNotFound(f"no {CIFAR_FOLDER} (data_batch_1..5, test_batch) in {data_dir}")


def download_cifar(data_dir: Path) -> None:
    """torchvision's downloader (it checks the archive's md5 before extracting)."""
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as exc:
        raise DataNotFound("torchvision is not installed (from the repository root: "
                           "pip install -e '.[download]')") from exc
    try:
        CIFAR10(str(data_dir), train=True, download=True)
    except Exception as exc:  # offline: URLError, socket errors, ...
        raise DataNotFound(f"download failed: {exc}") from exc


def read_batches(folder: Path, names) -> torch.Tensor:
    """The official python-format batches -> uint8 images ``[n, 3, 32, 32]``."""
    arrays = []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{folder / name}: expected b'data' uint8 [n, 3072], got {data.shape}")
        arrays.append(data.reshape(-1, 3, 32, 32))
    return torch.from_numpy(np.concatenate(arrays))


def load_cifar(data_dir: Path, download: bool):
    try:
        folder = find_cifar(data_dir)
    except DataNotFound as missing:
        if not download:
            raise
        try:
            download_cifar(data_dir)
            folder = find_cifar(data_dir)
        except DataNotFound as failure:
            raise DataNotFound(f"{missing}; {failure}") from failure
    return read_batches(folder, TRAIN_FILES), read_batches(folder, TEST_FILES)


def to_model_range(images_uint8: torch.Tensor, device) -> torch.Tensor:
    """``ToTensor()`` then ``Normalize((0.5,)*3, (1.0,)*3)``: pixels in [-0.5, 0.5]."""
    return images_uint8.to(device, non_blocking=True).float().div_(255).sub_(0.5)


# --- distributed ------------------------------------------------------------------------

def setup_distributed(device_arg: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# --- training ---------------------------------------------------------------------------

def build_model(args):
    options = dict(backend=args.backend, kmeans_init=getattr(args, "kmeans_init", True),
                   kmeans_iters=getattr(args, "kmeans_iters", 10))
    if getattr(args, "dead_code_threshold", None) is not None:
        options["dead_code_threshold"] = args.dead_code_threshold
    for name in ("cosine", "codebook_dim", "rotation_trick"):
        if getattr(args, name, None):
            options[name] = getattr(args, name)
    if getattr(args, "quantizer", "vq") == "rvq":
        options.update(num_quantizers=args.num_quantizers, groups=args.groups,
                       shared_codebook=args.shared_codebook,
                       quantize_dropout=args.quantize_dropout)
    if getattr(args, "quantizer", "vq") == "multiscale":
        options.update(scales=tuple(args.scales))
    return vqfast.VQVAE(args.num_hiddens, args.num_residual_layers, args.num_residual_hiddens,
                        args.num_embeddings, args.embedding_dim, args.commitment_cost, args.decay,
                        **options)


def load_checkpoint(path: Path, map_location):
    """A checkpoint of this script: tensors and plain containers only, loaded with
    ``weights_only=True`` so a checkpoint someone sent you cannot run code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        sys.exit(f"{path}: refused, it holds more than tensors and plain containers "
                 f"(weights_only=True): {str(error).splitlines()[0]}")


class CollapseWatch:
    """Warns once when the perplexity stays near 1 (every vector on one or two codes)."""

    def __init__(self, steps: int = 500, level: float = 2.0):
        self.steps, self.level, self.since, self.warned = steps, level, None, False

    def update(self, step: int, perplexity: float):
        if perplexity >= self.level:
            self.since = None
            return None
        self.since = step if self.since is None else self.since
        if not self.warned and step - self.since >= self.steps:
            self.warned = True
            return (f"step {step}: perplexity has stayed below {self.level} for "
                    f"{step - self.since} steps: the codebook has collapsed onto a few codes. "
                    "k-means init and --dead-code-threshold 1 (the defaults) avoid this; see "
                    "the README's quality table.")
        return None


def _truncate_logs(out: Path, step: int) -> None:
    """Drop log rows past ``step`` (written after the checkpoint a resume starts from)."""
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        rows = [line for line in metrics.read_text().splitlines()
                if line and json.loads(line)["step"] <= step]
        metrics.write_text("".join(r + "\n" for r in rows))
    steps = out / "steps.csv"
    if steps.exists():
        with open(steps) as f:
            rows = list(csv.reader(f))
        with open(steps, "w", newline="") as f:
            csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if int(r[0]) <= step])


def train(args, rank, world, device):
    out = Path(args.out)
    is_main = rank == 0
    torch.manual_seed(args.seed)
    try:
        train_images, test_images = load_cifar(Path(args.data_dir), download=not args.no_download)
    except DataNotFound as missing:
        sys.exit(f"CIFAR-10 not available: {missing}.\nDownload the python version "
                 "(https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz), extract it and "
                 f"pass --data-dir pointing at the folder that holds {CIFAR_FOLDER}.")
    data_variance = float((train_images.double() / 255).var())

    model = build_model(args).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, amsgrad=False)
    step, seconds_before = 0, 0.0
    checkpoint_path = out / "checkpoint.pt"
    if args.resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, seconds_before = state["step"], state.get("seconds", 0.0)
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        if is_main:
            _truncate_logs(out, step)
    elif args.resume and is_main:
        print(f"--resume: no checkpoint in {out}, starting at step 0")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=1))
        if step == 0:
            (out / "metrics.jsonl").write_text("")
            (out / "steps.csv").write_text("step,nmse,perplexity,codes_used\n")

    ddp_model = model
    if world > 1:
        # The EMA quantizer sums its per-code statistics over all ranks before each update
        # (sync_distributed), so its buffers agree everywhere; DDP's buffer broadcast from
        # rank 0 is then a no-op safeguard.
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    dataset = TensorDataset(train_images)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    batches_per_epoch = len(sampler) // args.batch_size
    if batches_per_epoch == 0:
        sys.exit(f"--batch-size {args.batch_size} is larger than the {len(sampler)} training "
                 "images per rank")

    def save_checkpoint():
        if not is_main:
            return
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "args": vars(args), "data_variance": data_variance,
                    "seconds": time.time() - start}, checkpoint_path.with_suffix(".tmp"))
        checkpoint_path.with_suffix(".tmp").replace(checkpoint_path)

    from tqdm import tqdm
    progress = tqdm(total=args.steps, initial=step, disable=not is_main, dynamic_ncols=True,
                    desc="train")
    window = []  # (nmse, perplexity, vq_loss, codes used) per step since the last log row
    watch = CollapseWatch()
    reseeded_before = int(getattr(model.vq, "reseeded_codes", torch.zeros(())).sum())
    model.train()
    start = time.time() - seconds_before  # the run's elapsed time continues across resumes
    while step < args.steps:
        epoch, position = divmod(step, batches_per_epoch)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        batches = [indices[i:i + args.batch_size]
                   for i in range(position * args.batch_size,
                                  batches_per_epoch * args.batch_size, args.batch_size)]
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                            pin_memory=device.type == "cuda")
        for (images,) in loader:
            x = to_model_range(images, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                vq_loss, x_recon, perplexity, codes = ddp_model(x, return_codes=True)
                recon_error = F.mse_loss(x_recon.float(), x) / data_variance
                loss = recon_error + vq_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            # codes this batch used (the first level's, for residual VQ): on the device,
            # read only at logging steps (no sync)
            first = codes[:, 0] if codes.dim() == 4 else codes
            used = torch.zeros(args.num_embeddings + 1, device=device).index_fill_(
                0, first.detach().reshape(-1) + 1, 1)[1:].sum()  # (-1: a masked position)
            window.append(torch.stack([recon_error.detach(), perplexity.detach().float().mean(),
                                       vq_loss.detach().float(), used]))
            # the first log rows early (steps 1 and 10), so the bar shows metrics from the start
            if step % args.log_every == 0 or step == args.steps or step in (1, 10):
                values = torch.stack(window).cpu()
                window.clear()
                mean = values.mean(0).tolist()
                row = {"step": step, "nmse": mean[0], "perplexity": mean[1], "vq_loss": mean[2],
                       "codes_used": mean[3], "seconds": time.time() - start}
                if hasattr(model.vq, "codebook_usage") and getattr(model.vq, "ema", True):
                    usage = model.vq.codebook_usage()  # the EMA's view (per level for RVQ)
                    usage = usage if isinstance(usage, list) else [usage]
                    reseeded = sum(u.reseeded_codes for u in usage)
                    row.update(codes_alive=sum(u.alive_codes for u in usage) / len(usage),
                               reseeded=reseeded - reseeded_before)
                    reseeded_before = reseeded
                progress.set_postfix(nmse=f"{mean[0]:.4f}", perplexity=f"{mean[1]:.1f}",
                                     codes=f"{mean[3]:.0f}")
                warning = watch.update(step, mean[1])
                if warning and is_main:
                    progress.write(f"warning: {warning}")
                if is_main:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    with open(out / "steps.csv", "a", newline="") as f:
                        first = step - len(values) + 1
                        csv.writer(f).writerows(
                            [first + i, f"{v[0]:.6g}", f"{v[1]:.6g}", f"{v[3]:.0f}"]
                            for i, v in enumerate(values.tolist()))
            progress.update(1)
            if step % args.checkpoint_every == 0:
                save_checkpoint()
            if step >= args.steps:
                break
    progress.close()
    save_checkpoint()

    if is_main:
        test_nmse = evaluate(model, test_images, data_variance, device, args)
        result = {"steps": step, "test_nmse": test_nmse}
        (out / "final.json").write_text(json.dumps(result, indent=1))
        print(f"step {step}: test NMSE {test_nmse:.4f}")
        draw_figures(out, model, test_images, device)
        print(f"outputs in {out}/: " + ", ".join(sorted(p.name for p in out.iterdir()
                                                        if p.suffix in (".png", ".json", ".jsonl", ".csv", ".pt"))))
    if world > 1:  # the other ranks wait for rank 0's evaluation and figures
        dist.barrier()
    return model


@torch.no_grad()
def evaluate(model, images, data_variance, device, args) -> float:
    """NMSE over the whole test set (eval mode: no EMA update)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(images), args.eval_batch_size):
        x = to_model_range(images[start:start + args.eval_batch_size], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            _, x_recon, _ = model(x)
        total += F.mse_loss(x_recon.float(), x, reduction="sum").item()
        count += x.numel()
    model.train()
    return total / count / data_variance


# --- figures ----------------------------------------------------------------------------

def _grid(images: torch.Tensor, columns: int = 8) -> np.ndarray:
    """``[n, 3, h, w]`` in [0, 1] -> one ``[rows*(h+2), columns*(w+2), 3]`` image (2-px gaps)."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    canvas = torch.ones(rows, columns, c, h + 2, w + 2)
    canvas.view(-1, c, h + 2, w + 2)[:n, :, 1:-1, 1:-1] = images
    return canvas.permute(0, 3, 1, 4, 2).reshape(rows * (h + 2), columns * (w + 2), c).numpy()


def _save_image(path: Path, image: np.ndarray, title: str) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 8 * image.shape[0] / image.shape[1] + 0.4))
    ax.imshow(image, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def smooth(values: np.ndarray) -> np.ndarray:
    """Savitzky-Golay smoothing sized to the series: the original's window 201 (order 7) at
    200k steps, about a twentieth of the points (odd, order 3) on shorter runs, none under
    15 points; clipped to the raw values' range, so a short run's fit cannot overshoot."""
    from scipy.signal import savgol_filter
    if len(values) < 15:
        return values
    window = min(201, max(5, len(values) // 20 * 2 + 1))
    order = 7 if window == 201 else 3
    return np.clip(savgol_filter(values, window, order), values.min(), values.max())


def plot_curves(out: Path) -> None:
    """NMSE on a log axis and perplexity, raw (faint) and smoothed (``smooth``), and beside
    them the codes each batch used (and, for the EMA quantizer, the codes alive and the
    re-seeds per logging step), where codebook collapse shows first."""
    import matplotlib.pyplot as plt
    with open(out / "steps.csv") as f:
        rows = np.array([[float(v) for v in r] for r in list(csv.reader(f))[1:]])
    if len(rows) < 3:
        print("fewer than 3 logged steps: no curves drawn")
        return
    fig, (ax_nmse, ax_perp, ax_codes) = plt.subplots(1, 3, figsize=(22, 6))
    for ax, column, title in ((ax_nmse, 1, "NMSE"), (ax_perp, 2, "Average codebook usage (perplexity)")):
        ax.plot(rows[:, 0], rows[:, column], color="C0", alpha=0.25, lw=0.6, label="per step")
        ax.plot(rows[:, 0], smooth(rows[:, column]), color="C0", label="smoothed")
        ax.set_title(f"{title}.")
        ax.legend()
    ax_nmse.set_yscale("log")
    if rows.shape[1] > 3:
        ax_codes.plot(rows[:, 0], rows[:, 3], lw=0.5, label="codes used by the batch")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    alive = [(m["step"], m["codes_alive"], m["reseeded"]) for m in metrics if "codes_alive" in m]
    if alive:
        steps, codes_alive, reseeded = zip(*alive)
        ax_codes.plot(steps, codes_alive, label="codes alive (EMA size >= 1)")
        ax_codes.plot(steps, reseeded, label="codes re-seeded per logging step")
    ax_codes.set_title("Codebook usage.")
    ax_codes.legend()
    for ax in (ax_nmse, ax_perp, ax_codes):
        ax.set_xlabel("iteration")
    fig.savefig(out / "curves.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def draw_figures(out: Path, model, test_images, device) -> None:
    """The seed's figures from the first 32 test images."""
    plot_curves(out)
    model.eval()
    originals = to_model_range(test_images[:32], device)
    z = model.pre_vq_conv(model.encoder(originals))
    _, quantized, _, _ = model.vq(z)
    reconstructions = model.decoder(quantized)
    show = lambda t: _grid((t.float().cpu() + 0.5).clamp(0, 1))  # noqa: E731
    _save_image(out / "originals.png", show(originals), "validation originals")
    side_by_side = np.concatenate([show(originals), np.ones((show(originals).shape[0], 8, 3)),
                                   show(reconstructions)], axis=1)
    _save_image(out / "reconstructions.png", side_by_side,
                "validation originals (left) and their reconstructions (right)")

    # Latents to RGB: channels-last before flattening (the seed viewed [B, D, h, w] as [N, D]).
    b, d, h, w = quantized.shape
    latents = quantized.float().movedim(1, -1).reshape(-1, d).cpu()
    _, _, v = torch.pca_lowrank(latents, q=3)
    rgb = (latents @ v[:, :3]).view(b, h, w, 3).movedim(-1, 1)
    low = rgb.amin(dim=(2, 3), keepdim=True)
    high = rgb.amax(dim=(2, 3), keepdim=True)
    _save_image(out / "latents_pca.png", _grid((rgb - low) / (high - low).clamp_min(1e-12)),
                "quantized latents, PCA to RGB")

    # Image i decoded with latent position i (row-major over h x w) zeroed.
    masks = torch.ones(b, 1, h, w, device=device)
    for i in range(min(b, h * w)):
        masks[i, :, i // w, i % w] = 0
    masked = model.decoder(quantized * masks.to(quantized.dtype))
    _save_image(out / "masked_reconstructions.png", show(masked),
                "reconstructions, latent position i masked in image i")

    try:
        import umap
    except ImportError:
        print("umap-learn not installed: no codebook UMAP figure (pip install umap-learn)")
    else:
        import matplotlib.pyplot as plt
        codebook = model.vq._codebooks()[0] if hasattr(model.vq, "codebooks") else model.vq.codebook
        codebook = codebook.detach().float().cpu().numpy()
        proj = umap.UMAP(n_neighbors=3, min_dist=0.1, metric="cosine").fit_transform(codebook)
        fig, ax = plt.subplots(figsize=(8, 8))
        ax.scatter(proj[:, 0], proj[:, 1], alpha=0.3)
        ax.set_title("codebook, UMAP")
        fig.savefig(out / "codebook_umap.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
    model.train()


def plots_only(run_dir: Path, args) -> None:
    if not (run_dir / "checkpoint.pt").is_file():
        sys.exit(f"--plots-only: no checkpoint.pt in {run_dir} (pass the --out folder of a run)")
    state = load_checkpoint(run_dir / "checkpoint.pt", "cpu")
    saved = argparse.Namespace(**state["args"])
    model = build_model(saved)
    model.load_state_dict(state["model"])
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    model.to(device)
    data_dir = Path(args.data_dir or saved.data_dir)
    try:
        _, test_images = load_cifar(data_dir, download=False)
    except DataNotFound as missing:
        plot_curves(run_dir)
        print(f"curves redrawn; image figures need the data ({missing})")
        return
    draw_figures(run_dir, model, test_images, device)


# --- command line -----------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200_000, help="training updates")
    p.add_argument("--batch-size", type=int, default=256, help="per process")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--num-hiddens", type=int, default=128)
    p.add_argument("--num-residual-hiddens", type=int, default=32)
    p.add_argument("--num-residual-layers", type=int, default=2)
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--num-embeddings", type=int, default=512)
    p.add_argument("--commitment-cost", type=float, default=0.25)
    p.add_argument("--decay", type=float, default=0.99, help="EMA decay; 0 = the seed's plain quantizer")
    p.add_argument("--kmeans-init", action=argparse.BooleanOptionalAction, default=True,
                   help="codebook from k-means of the first batch (default: on)")
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--dead-code-threshold", type=float, default=None,
                   help="re-seed codes whose (bias-corrected) usage per batch falls below it "
                        "(default: the quantizer's, 0.5 for the EMA one and 1 otherwise; "
                        "0 = off; learned residual codebooks do not re-seed)")
    p.add_argument("--original-algorithm", action="store_true",
                   help="the paper's algorithm: no k-means init, no re-seeding (it can "
                        "collapse the codebook onto a few codes)")
    p.add_argument("--quantizer", default="vq", choices=["vq", "rvq", "multiscale"],
                   help="vq: one codebook (the paper's); rvq: residual VQ (vqfast.ResidualVQ); "
                        "multiscale: VAR's multi-scale residual VQ (vqfast.MultiScaleResidualVQ)")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8],
                   help="(--quantizer multiscale) token map sizes, coarse to fine; the last is "
                        "the latent's: images / 4 (8 for CIFAR-10)")
    p.add_argument("--num-quantizers", type=int, default=4, help="residual levels (--quantizer rvq)")
    p.add_argument("--groups", type=int, default=1, help="channel groups (--quantizer rvq)")
    p.add_argument("--shared-codebook", action="store_true",
                   help="one codebook for all levels of a group (--quantizer rvq)")
    p.add_argument("--quantize-dropout", action="store_true",
                   help="train on the first n levels, n random per batch (--quantizer rvq)")
    p.add_argument("--cosine", action="store_true", help="l2-normalised codes and inputs")
    p.add_argument("--codebook-dim", type=int, default=None,
                   help="factorized codes: project to this many dims for the lookup")
    p.add_argument("--rotation-trick", action="store_true",
                   help="the rotation trick's gradient instead of straight-through")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--out", default="runs/cifar10", help="output directory")
    p.add_argument("--data-dir", default=None,
                   help=f"folder holding (or to download) {CIFAR_FOLDER} (default: data; "
                        "with --plots-only: the run's)")
    p.add_argument("--no-download", action="store_true", help="never try to download the data")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=5000)
    p.add_argument("--eval-batch-size", type=int, default=1000)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--plots-only", metavar="RUN_DIR", help="redraw the figures of a finished run")
    return p


# What a resumed run may change when given again: how long it runs (--steps, the new
# total), where and how it runs, how often it logs (unset, they too come from the
# checkpoint). Everything else is the run's recipe and comes from its checkpoint.
RUN_FLAGS = {"steps", "device", "backend", "workers", "data_dir", "no_download", "log_every",
             "checkpoint_every", "eval_batch_size"}
THIS_INVOCATION = {"out", "resume", "plots_only"}


def settings_from_checkpoint(args, argv, parser):
    """For ``--resume``: the recipe saved in the run's checkpoint, with the run flags given
    now; a recipe flag given now that contradicts the checkpoint exits naming both values."""
    checkpoint = Path(args.out) / "checkpoint.pt"
    if not checkpoint.is_file():
        return args
    saved = load_checkpoint(checkpoint, "cpu").get("args")
    if saved is None:
        return args
    explicit = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for action in parser._actions:  # the same flags, without defaults: what was given
        if action.option_strings and action.dest != "help":
            clone = copy.copy(action)
            clone.default = argparse.SUPPRESS
            explicit._add_action(clone)
    given = vars(explicit.parse_known_args(argv)[0])
    clashes = [f"--{name.replace('_', '-')} {value!r} (the checkpoint has {saved.get(name)!r})"
               for name, value in given.items()
               if name not in RUN_FLAGS | THIS_INVOCATION and name in saved and saved[name] != value]
    if clashes:
        sys.exit(f"--resume: {checkpoint} was trained with other settings: "
                 + "; ".join(clashes) + ". Drop these flags to continue the run as it was, "
                 "or pass another --out to start a new one.")
    merged = {**vars(args), **{k: v for k, v in saved.items()
                               if k not in THIS_INVOCATION and not (k in RUN_FLAGS and k in given)}}
    return argparse.Namespace(**merged)


def resolve_codebook_options(args) -> None:
    """``--original-algorithm`` in place; without a threshold the quantizer's own
    default applies (``None``)."""
    learned_rvq = args.quantizer in ("rvq", "multiscale") and args.decay == 0
    if args.quantizer == "multiscale":
        unsupported = [f"--{name.replace('_', '-')}" for name in ("cosine", "codebook_dim",
                                                                    "rotation_trick")
                       if getattr(args, name, None)]
        if unsupported:
            sys.exit(f"{', '.join(unsupported)}: not options of --quantizer multiscale")
    if args.original_algorithm:
        args.kmeans_init, args.dead_code_threshold = False, 0.0
    if args.dead_code_threshold and learned_rvq:
        sys.exit("--dead-code-threshold: learned residual codebooks do not re-seed; use the "
                 "EMA quantizer (--decay > 0) or --dead-code-threshold 0")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plots_only:
        plots_only(Path(args.plots_only), args)
        return
    if args.resume:
        args = settings_from_checkpoint(args, sys.argv[1:] if argv is None else argv, parser)
    args.data_dir = args.data_dir or "data"
    resolve_codebook_options(args)
    for name in ("steps", "batch_size", "log_every", "checkpoint_every", "eval_batch_size"):
        if getattr(args, name) < 1:
            sys.exit(f"--{name.replace('_', '-')} must be >= 1")
    rank, world, device = setup_distributed(args.device)
    try:
        train(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
