"""Train the VQ-VAE of van den Oord et al. on CIFAR-10 with vqfast (the original notebook, done right).

Defaults are the paper's and the original notebook's: batch 256, 200,000 updates, Adam lr
1e-4, hiddens 128 / residual hiddens 32 / 2 residual layers, D = 64, K = 512, commitment
0.25, EMA decay 0.99 (``--decay 0`` is the plain quantizer). The notebook reached NMSE 0.053
and perplexity ~254 at 200k steps. The quantizer takes vqfast's defaults, k-means init and
dead-code re-seeding, which keep the codebook in use; ``--original-algorithm`` turns both
off (the paper's algorithm).

Data (``--data``): ``cifar10`` (downloaded into ``--data-dir`` with the standard library,
md5-checked, unless ``--no-download``); ``photos``: 32x32 crops of the sample photographs
shipped with scikit-image and scikit-learn (NOT CIFAR-10: no download, for a first run or a
machine offline; test crops come from two photos never trained on); ``auto`` (default):
CIFAR-10 when it is in ``--data-dir``, else the photos.

    python examples/train_cifar10.py --data photos --steps 600 --batch-size 32 --lr 1e-3 --out runs/quickstart
    python examples/train_cifar10.py --data cifar10 --out runs/cifar10
    torchrun --nproc_per_node=8 examples/train_cifar10.py --out runs/cifar10
    python examples/train_cifar10.py --out runs/cifar10 --resume
    python examples/train_cifar10.py --plots-only runs/cifar10

Ctrl-C (or SIGTERM) finishes the current step, saves the checkpoint and stops; ``--resume``
continues from it. Writes to ``--out``: ``metrics.jsonl`` (every ``--log-every`` steps),
``steps.csv`` (per-step NMSE, perplexity, codes used), ``checkpoint.pt`` (every
``--checkpoint-every`` steps, on Ctrl-C and at the end), ``final.json`` (test-set NMSE and
codes used) and the original notebook's figures as PNGs.
"""

import argparse
import copy
import csv
import hashlib
import json
import os
import pickle
import shutil
import signal
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import vqfast

ROOT = Path(__file__).resolve().parents[1]
CIFAR_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"  # the archive's, as published with it
TEST_PHOTOS = ("chelsea", "coffee")  # held out: the photo crops' test set
PHOTO_STRIDE = 16  # training crops overlap by half
DATA_LABELS = {
    "cifar10": "CIFAR-10",
    "photos": "photo crops (scikit-image / scikit-learn sample photos), NOT CIFAR-10",
}


# --- data -------------------------------------------------------------------------------

class DataNotFound(RuntimeError):
    pass


def find_cifar(data_dir: Path) -> Path:
    """The ``cifar-10-batches-py`` folder: ``data_dir`` itself or its child."""
    for candidate in (data_dir, data_dir / CIFAR_FOLDER):
        if all((candidate / name).is_file() for name in TRAIN_FILES + TEST_FILES):
            return candidate
    raise DataNotFound(f"no {CIFAR_FOLDER} (data_batch_1..5, test_batch) in {data_dir}")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract(archive: Path, into: Path) -> None:
    """Extract a tarball, refusing members that would land outside ``into`` or are not
    plain files and folders (``filter="data"`` where this Python has it)."""
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
            return
        root = into.resolve()
        for member in tar.getmembers():
            target = (into / member.name).resolve()
            if not (member.isfile() or member.isdir()) or root not in (target, *target.parents):
                raise DataNotFound(f"{archive}: refused member {member.name!r}")
        tar.extractall(into)


def download_cifar(data_dir: Path, url: str = CIFAR_URL, md5: str = CIFAR_MD5) -> None:
    """Fetch the python version of CIFAR-10 (163 MB) into ``data_dir`` with the standard
    library, check the archive's md5 and extract it. Installs nothing."""
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = data_dir / url.rsplit("/", 1)[-1]
    if not archive.is_file():
        partial = archive.with_name(archive.name + ".part")
        print(f"downloading {url} to {archive} ...", flush=True)
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
        except (OSError, urllib.error.URLError) as exc:  # offline, refused, timed out
            partial.unlink(missing_ok=True)
            raise DataNotFound(f"download of {url} failed: {exc}") from exc
        partial.replace(archive)
    found = _md5(archive)
    if found != md5:
        archive.unlink()
        raise DataNotFound(f"{archive} had md5 {found}, not {md5} (a damaged or different "
                           "file; deleted, run again to download it anew)")
    try:
        _extract(archive, data_dir)
    except tarfile.TarError as exc:  # filter="data" refusing a member, a truncated archive
        raise DataNotFound(f"{archive}: not extracted: {exc}") from exc
    print(f"CIFAR-10 extracted to {data_dir / CIFAR_FOLDER}", flush=True)


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


def load_photos():
    """The ``photos`` data: 32x32 crops of the sample photographs shipped with scikit-image
    and scikit-learn (the crops of ``benchmarks/quality.py``), uint8 ``[n, 3, 32, 32]``;
    training crops ``PHOTO_STRIDE`` apart from every photo but ``TEST_PHOTOS``, test crops
    side by side from those two, so the test set shows photos the model never saw."""
    if str(ROOT) not in sys.path:  # the repository's benchmarks package, run from a clone
        sys.path.insert(0, str(ROOT))
    from benchmarks import quality
    try:
        photos = quality.photographs()
    except ImportError as exc:
        raise DataNotFound(f"--data photos needs scikit-image ({exc}; from the repository "
                           "root: pip install -e '.[dev,examples]')") from exc
    train, test = [], []
    for name, image in photos.items():
        x = quality.channels_first(image)
        if name in TEST_PHOTOS:
            test.append(quality.tiles(x))
        else:
            train.append(quality.tiles(x, PHOTO_STRIDE))
    return torch.cat(train), torch.cat(test)


def load_data(args):
    """``(kind, train, test)``: uint8 ``[n, 3, 32, 32]`` images of ``args.data``
    (``auto``: CIFAR-10 when it is in ``--data-dir``, else the photos)."""
    data_dir = Path(args.data_dir)
    kind = args.data
    if kind == "auto":
        try:
            find_cifar(data_dir)
            kind = "cifar10"
        except DataNotFound:
            print(f"CIFAR-10 is not in {data_dir}/ (--data cifar10 downloads it, 163 MB): "
                  f"training on {DATA_LABELS['photos']}", flush=True)
            kind = "photos"
    if kind == "photos":
        return (kind, *load_photos())
    return (kind, *load_cifar(data_dir, download=not args.no_download))


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

    def __init__(self, steps: int = 500, level: float = 2.0, advice: str = ""):
        self.steps, self.level, self.since, self.warned = steps, level, None, False
        self.advice = advice or ("k-means init and dead-code re-seeding (the defaults: "
                                 "--kmeans-init and the quantizer's --dead-code-threshold) "
                                 "keep it in use")

    def update(self, step: int, perplexity: float):
        if perplexity >= self.level:
            self.since = None
            return None
        self.since = step if self.since is None else self.since
        if not self.warned and step - self.since >= self.steps:
            self.warned = True
            return (f"step {step}: perplexity has stayed below {self.level} for "
                    f"{step - self.since} steps: the codebook has collapsed onto a few codes. "
                    f"{self.advice}; see the README's Training quality.")
        return None


def collapse_advice(args) -> str:
    """What keeps this run's codebook in use: its quantizer's own defaults, by name."""
    defaults = argparse.Namespace(**{**vars(args), "kmeans_init": True, "dead_code_threshold": None})
    threshold = build_model(defaults).vq.dead_code_threshold
    if not threshold:
        return ("k-means init (--kmeans-init, the default) helps; learned residual codebooks "
                "do not re-seed: the EMA quantizer (--decay 0.99) does")
    return (f"k-means init and dead-code re-seeding (this quantizer's defaults: --kmeans-init "
            f"--dead-code-threshold {threshold:g}) keep it in use")


class StopRequest:
    """Ctrl-C or SIGTERM during training: the step under way finishes, the checkpoint is
    saved and the run stops (a second Ctrl-C stops at once). Under torchrun the ranks
    agree on it at logging steps, so they stop at the same step."""

    def __init__(self):
        self.name, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        if self.name is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.name = signal.Signals(number).name

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def stop(self, step: int, log_step: bool, world: int, device) -> bool:
        if world == 1:
            return self.name is not None
        if not log_step:
            return False
        flag = torch.tensor([float(self.name is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.name = self.name or ("a signal to another rank" if flag.item() else None)
        return self.name is not None


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


def describe_device(device, args, model) -> str:
    path = vqfast.ops.dispatch.resolve_backend(args.backend, device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    return (f"device: {device} ({where}), torch {torch.__version__}; "
            f"{type(model.vq).__name__} on the {path} path")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class Interrupted(Exception):
    """Training stopped by Ctrl-C / SIGTERM after saving its checkpoint."""


def train(args, rank, world, device):
    out = Path(args.out)
    is_main = rank == 0
    torch.manual_seed(args.seed)
    try:
        args.data, train_images, test_images = load_data(args)
    except DataNotFound as missing:
        sys.exit(f"CIFAR-10 not available: {missing}.\nEither fetch it (python "
                 f"examples/train_cifar10.py --data cifar10 downloads {CIFAR_URL} with the "
                 "standard library and checks its md5), or download and extract it yourself and "
                 f"pass --data-dir pointing at the folder that holds {CIFAR_FOLDER}, or train "
                 "on the photo crops shipped with scikit-image: --data photos.")
    label = DATA_LABELS[args.data]
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
            print(f"resuming from {checkpoint_path} at step {step}")
    elif args.resume and is_main:
        print(f"--resume: no checkpoint in {out}, starting at step 0")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=1))
        if step == 0:
            (out / "metrics.jsonl").write_text("")
            (out / "steps.csv").write_text("step,nmse,perplexity,codes_used\n")
        print(describe_device(device, args, model) + (f", {world} processes" if world > 1 else ""))
        print(f"data: {label}: {len(train_images):,} training and {len(test_images):,} test "
              f"images; {args.steps:,} steps of batch {args.batch_size}", flush=True)

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

    from tqdm import tqdm
    progress = tqdm(total=args.steps, initial=step, disable=not is_main, dynamic_ncols=True,
                    desc="train")

    def save_checkpoint(why: str = ""):
        if not is_main:
            return
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "args": vars(args), "data_variance": data_variance,
                    "seconds": time.time() - start}, checkpoint_path.with_suffix(".tmp"))
        checkpoint_path.with_suffix(".tmp").replace(checkpoint_path)
        progress.write(f"step {step}: checkpoint saved to {checkpoint_path}{why}")

    window = []  # (nmse, perplexity, vq_loss, codes used) per step since the last log row
    watch = CollapseWatch(advice=collapse_advice(args))
    reseeded_before = int(getattr(model.vq, "reseeded_codes", torch.zeros(())).sum())
    # the bar's metrics every step on CPU; every 10th on CUDA, where reading them waits for the GPU
    refresh = 1 if device.type == "cpu" else 10
    timed_from, first_step, stopped = None, step, False
    model.train()
    start = time.time() - seconds_before  # the run's elapsed time continues across resumes
    with StopRequest() as stop:
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
                # read at refresh and logging steps
                first = codes[:, 0] if codes.dim() == 4 else codes
                used = torch.zeros(args.num_embeddings + 1, device=device).index_fill_(
                    0, first.detach().reshape(-1) + 1, 1)[1:].sum()  # (-1: a masked position)
                window.append(torch.stack([recon_error.detach(), perplexity.detach().float().mean(),
                                           vq_loss.detach().float(), used]))
                if step == first_step + 1:  # the first step runs k-means: time the steps after it
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    timed_from = time.perf_counter()
                elif step == first_step + 11 and is_main:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    per_step = (time.perf_counter() - timed_from) / 10
                    progress.write(f"{per_step:.3f} s/step (steps {first_step + 2}-{step}): the "
                                   f"{args.steps - step:,} steps left take about "
                                   f"{_minutes(per_step * (args.steps - step))}")
                log_step = step % args.log_every == 0 or step == args.steps or step in (1, 10)
                if step % refresh == 0 or log_step:
                    last = window[-1].tolist()
                    progress.set_postfix(nmse=f"{last[0]:.4f}", perplexity=f"{last[1]:.1f}",
                                         codes=f"{last[3]:.0f}", refresh=False)
                # the first log rows early (steps 1 and 10), so the curves start at the start
                if log_step:
                    values = torch.stack(window).cpu()
                    window.clear()
                    mean = values.mean(0).tolist()
                    row = {"step": step, "nmse": mean[0], "perplexity": mean[1],
                           "vq_loss": mean[2], "codes_used": mean[3], "seconds": time.time() - start}
                    if hasattr(model.vq, "codebook_usage") and getattr(model.vq, "ema", True):
                        usage = model.vq.codebook_usage()  # the EMA's view (per level for RVQ)
                        usage = usage if isinstance(usage, list) else [usage]
                        reseeded = sum(u.reseeded_codes for u in usage)
                        row.update(codes_alive=sum(u.alive_codes for u in usage) / len(usage),
                                   alive_threshold=model.vq.dead_code_threshold or 1.0,
                                   reseeded=reseeded - reseeded_before)
                        reseeded_before = reseeded
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
                if stop.stop(step, log_step, world, device):
                    stopped = True
                    break
                if step >= args.steps:
                    break
                if step % args.checkpoint_every == 0:
                    save_checkpoint()
            if stopped:
                break
        if stopped:
            if window and is_main:  # the steps since the last log row, so a resume has them
                with open(out / "steps.csv", "a", newline="") as f:
                    values = torch.stack(window).cpu().tolist()
                    csv.writer(f).writerows(
                        [step - len(values) + 1 + i, f"{v[0]:.6g}", f"{v[1]:.6g}", f"{v[3]:.0f}"]
                        for i, v in enumerate(values))
            save_checkpoint(f" ({stop.name})")
            progress.close()
            if is_main:
                print(f"stopped at step {step} of {args.steps}. Continue with: python "
                      f"examples/train_cifar10.py --out {out} --resume; figures of the run so "
                      f"far: python examples/train_cifar10.py --plots-only {out}")
            raise Interrupted(stop.name)
    progress.close()
    save_checkpoint(" (end of training)")

    if is_main:
        result = {"steps": step, "data": args.data,
                  **evaluate(model, test_images, data_variance, device, args)}
        (out / "final.json").write_text(json.dumps(result, indent=1))
        print(f"step {step}: test NMSE {result['test_nmse']:.4f}, test perplexity "
              f"{result['test_perplexity']:.1f}, {result['test_codes_used']} of "
              f"{args.num_embeddings} codes used by the test set ({label}); saved to "
              f"{out / 'final.json'}")
        written = draw_figures(out, model, test_images, device, label, umap_figure=args.umap)
        print(f"figures saved to {out}/: {', '.join(written)}")
    if world > 1:  # the other ranks wait for rank 0's evaluation and figures
        dist.barrier()
    return model


@torch.no_grad()
def evaluate(model, images, data_variance, device, args) -> dict:
    """NMSE over the whole test set, its perplexity and the codes it used (the first
    level's for residual VQ; eval mode: no EMA update)."""
    model.eval()
    total, count = 0.0, 0
    counts = torch.zeros(args.num_embeddings + 1, dtype=torch.long, device=device)
    for start in range(0, len(images), args.eval_batch_size):
        x = to_model_range(images[start:start + args.eval_batch_size], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            _, x_recon, _, codes = model(x, return_codes=True)
        total += F.mse_loss(x_recon.float(), x, reduction="sum").item()
        count += x.numel()
        first = codes[:, 0] if codes.dim() == 4 else codes
        counts += torch.bincount(first.reshape(-1) + 1, minlength=len(counts))
    model.train()
    share = counts[1:].double() / counts[1:].sum().clamp_min(1)
    perplexity = float(torch.exp(-(share * share.clamp_min(1e-12).log()).sum()))
    return {"test_nmse": total / count / data_variance, "test_perplexity": perplexity,
            "test_codes_used": int((counts[1:] > 0).sum())}


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


def plot_curves(out: Path, label: str = "") -> bool:
    """NMSE on a log axis and perplexity, raw (faint) and smoothed (``smooth``), and beside
    them the codebook's use: codes each batch used, codes alive (EMA usage at or above the
    run's threshold) and, on their own axis, the codes re-seeded per logging interval.
    Returns whether ``curves.png`` was drawn."""
    import matplotlib.pyplot as plt
    with open(out / "steps.csv") as f:
        rows = np.array([[float(v) for v in r] for r in list(csv.reader(f))[1:]])
    if len(rows) < 3:
        print("fewer than 3 logged steps: no curves drawn")
        return False
    fig, (ax_nmse, ax_perp, ax_codes) = plt.subplots(1, 3, figsize=(22, 6))
    for ax, column, title, ylabel in (
            (ax_nmse, 1, "Reconstruction error (NMSE)", "NMSE: MSE / variance of the training pixels"),
            (ax_perp, 2, "Average codebook usage (perplexity)", "perplexity of the batch's codes")):
        ax.plot(rows[:, 0], rows[:, column], color="C0", alpha=0.25, lw=0.6, label="per step")
        ax.plot(rows[:, 0], smooth(rows[:, column]), color="C0", label="smoothed")
        ax.set_title(f"{title}.")
        ax.set_ylabel(ylabel)
        ax.legend()
    ax_nmse.set_yscale("log")
    if rows.shape[1] > 3:
        ax_codes.plot(rows[:, 0], rows[:, 3], lw=0.5, color="C0", label="codes used by the batch")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    alive = [(m["step"], m["codes_alive"], m["reseeded"], m.get("alive_threshold", 1.0))
             for m in metrics if "codes_alive" in m]
    ax_codes.set_ylabel("codes")
    ax_codes.set_ylim(bottom=0)
    handles = []
    if alive:
        steps, codes_alive, reseeded, threshold = zip(*alive)
        ax_codes.plot(steps, codes_alive, color="C1",
                      label=f"codes alive (EMA usage >= {threshold[-1]:g} vectors per batch)")
        ax_reseed = ax_codes.twinx()
        ax_reseed.step(steps, reseeded, where="post", color="C3", lw=0.8,
                       label="codes re-seeded (right axis)")
        ax_reseed.set_ylabel("codes re-seeded per logging interval", color="C3")
        ax_reseed.set_ylim(0, 1.1 * max(1, *reseeded))
        handles = ax_reseed.get_legend_handles_labels()
    own = ax_codes.get_legend_handles_labels()
    ax_codes.legend(own[0] + (handles[0] if handles else []), own[1] + (handles[1] if handles else []),
                    loc="center right")
    ax_codes.set_title("Codebook usage.")
    for ax in (ax_nmse, ax_perp, ax_codes):
        ax.set_xlabel("training step")
    if label:
        fig.suptitle(f"training on {label}")
    fig.savefig(out / "curves.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


@torch.no_grad()
def draw_figures(out: Path, model, test_images, device, label: str = "CIFAR-10",
                 umap_figure: bool = False) -> list:
    """The original notebook's figures from the first 32 test images; returns the files
    written."""
    written = ["curves.png"] if plot_curves(out, label) else []
    model.eval()
    originals = to_model_range(test_images[:32], device)
    z = model.pre_vq_conv(model.encoder(originals))
    _, quantized, _, _ = model.vq(z)
    reconstructions = model.decoder(quantized)
    show = lambda t: _grid((t.float().cpu() + 0.5).clamp(0, 1))  # noqa: E731
    gap = lambda image: np.ones((image.shape[0], 8, 3))  # noqa: E731
    _save_image(out / "originals.png", show(originals), f"test originals\n{label}")
    side_by_side = np.concatenate([show(originals), gap(show(originals)), show(reconstructions)], axis=1)
    _save_image(out / "reconstructions.png", side_by_side,
                f"test originals (left) and their reconstructions (right)\n{label}")
    written += ["originals.png", "reconstructions.png"]

    # Latents to RGB: channels-last before flattening (the notebook viewed [B, D, h, w] as [N, D]).
    b, d, h, w = quantized.shape
    latents = quantized.float().movedim(1, -1).reshape(-1, d).cpu()
    _, _, v = torch.pca_lowrank(latents, q=3)
    rgb = (latents @ v[:, :3]).view(b, h, w, 3).movedim(-1, 1)
    low = rgb.amin(dim=(2, 3), keepdim=True)
    high = rgb.amax(dim=(2, 3), keepdim=True)
    _save_image(out / "latents_pca.png", _grid((rgb - low) / (high - low).clamp_min(1e-12)),
                f"quantized latents, PCA to RGB\n{label}")

    # Image i decoded with latent position i (row-major over h x w) zeroed, beside the
    # reconstruction without the mask: what one latent position holds.
    masks = torch.ones(b, 1, h, w, device=device)
    for i in range(min(b, h * w)):
        masks[i, :, i // w, i % w] = 0
    masked = model.decoder(quantized * masks.to(quantized.dtype))
    side_by_side = np.concatenate([show(reconstructions), gap(show(masked)), show(masked)], axis=1)
    _save_image(out / "masked_reconstructions.png", side_by_side,
                f"reconstructions (left) and the same with latent position i of {h}x{w} "
                f"zeroed in image i (right)\n{label}")
    written += ["latents_pca.png", "masked_reconstructions.png"]

    if umap_figure:
        try:
            import umap
        except ImportError:
            print("umap-learn not installed: no codebook UMAP figure (pip install umap-learn)")
        else:
            import matplotlib.pyplot as plt
            codebook = (model.vq._codebooks()[0] if hasattr(model.vq, "codebooks")
                        else model.vq.codebook)
            codebook = codebook.detach().float().cpu().numpy()
            proj = umap.UMAP(n_neighbors=3, min_dist=0.1, metric="cosine").fit_transform(codebook)
            fig, ax = plt.subplots(figsize=(8, 8))
            ax.scatter(proj[:, 0], proj[:, 1], alpha=0.3)
            ax.set_title(f"codebook, UMAP (trained on {label})")
            fig.savefig(out / "codebook_umap.png", dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append("codebook_umap.png")
    model.train()
    return written


def plots_only(run_dir: Path, args) -> None:
    if not (run_dir / "checkpoint.pt").is_file():
        sys.exit(f"--plots-only: no checkpoint.pt in {run_dir} (pass the --out folder of a run)")
    state = load_checkpoint(run_dir / "checkpoint.pt", "cpu")
    saved = argparse.Namespace(**{"data": "cifar10", **state["args"]})
    model = build_model(saved)
    model.load_state_dict(state["model"])
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    model.to(device)
    saved.data_dir = args.data_dir or saved.data_dir
    saved.no_download = True
    try:
        _, _, test_images = load_data(saved)
    except DataNotFound as missing:
        drawn = plot_curves(run_dir, DATA_LABELS[saved.data])
        print(f"{'curves.png redrawn in ' + str(run_dir) if drawn else 'no figure drawn'}; "
              f"the image figures need the data ({missing})")
        return
    written = draw_figures(run_dir, model, test_images, device, DATA_LABELS[saved.data],
                           umap_figure=args.umap)
    print(f"figures of step {state['step']} saved to {run_dir}/: {', '.join(written)}")


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
    p.add_argument("--decay", type=float, default=0.99, help="EMA decay; 0 = the plain quantizer (learned codebook)")
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
    p.add_argument("--data", default="auto", choices=["auto", "cifar10", "photos"],
                   help="cifar10: CIFAR-10 from --data-dir, downloaded there if absent (163 MB, "
                        "md5-checked); photos: 32x32 crops of the photos shipped with "
                        "scikit-image / scikit-learn, not CIFAR-10, no download; auto (default): "
                        "CIFAR-10 when it is in --data-dir, else the photos")
    p.add_argument("--data-dir", default=None,
                   help=f"folder holding (or to download) {CIFAR_FOLDER} (default: data; "
                        "with --plots-only: the run's)")
    p.add_argument("--no-download", action="store_true", help="--data cifar10: never download")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=500,
                   help="steps between checkpoints (one is also saved on Ctrl-C / SIGTERM and "
                        "at the end)")
    p.add_argument("--umap", action="store_true",
                   help="also draw a UMAP of the codebook (umap-learn; a minute or two)")
    p.add_argument("--eval-batch-size", type=int, default=1000)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--plots-only", metavar="RUN_DIR", help="redraw the figures of a finished run")
    return p


# What a resumed run may change when given again: how long it runs (--steps, the new
# total), where and how it runs, how often it logs (unset, they too come from the
# checkpoint). Everything else is the run's recipe and comes from its checkpoint.
RUN_FLAGS = {"steps", "device", "backend", "workers", "data_dir", "no_download", "log_every",
             "checkpoint_every", "eval_batch_size", "umap"}
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
        return train(args, rank, world, device)
    except Interrupted as stopped:
        sys.exit(130 if str(stopped) == "SIGINT" else 143)
    except KeyboardInterrupt:
        checkpoint = Path(args.out) / "checkpoint.pt"
        sys.exit("interrupted" + (f"; the last checkpoint is {checkpoint}" if checkpoint.is_file()
                                  else ""))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
