"""examples/train_cifar10.py end to end on a tiny CIFAR-format fixture (CPU, a few steps)."""

import hashlib
import importlib.util
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_cifar10.py"
spec = importlib.util.spec_from_file_location("train_cifar10", SCRIPT)
train_cifar10 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_cifar10)

FIGURES = ["curves.png", "originals.png", "reconstructions.png", "latents_pca.png",
           "masked_reconstructions.png"]
TINY = ["--batch-size", "16", "--num-hiddens", "32", "--num-residual-hiddens", "8",
        "--embedding-dim", "16", "--num-embeddings", "32", "--lr", "1e-3", "--log-every", "5",
        "--checkpoint-every", "10", "--eval-batch-size", "20", "--device", "cpu", "--no-download"]


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """CIFAR-10's official python format: pickled dicts with b'data' uint8 [n, 3072] and b'labels'."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 40) for i in range(1, 6)] + [("test_batch", 50)]:
        blocks = rng.integers(0, 256, size=(n, 3, 4, 4)).astype(np.uint8)
        data = blocks.repeat(8, axis=2).repeat(8, axis=3).reshape(n, 3072)  # learnable structure
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": rng.integers(0, 10, n).tolist()}, f)
    return root


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _steps_logged(out):
    return [int(line.split(",")[0]) for line in (out / "steps.csv").read_text().splitlines()[1:]]


def test_reads_official_format(cifar_dir):
    train, test = train_cifar10.load_cifar(cifar_dir, download=False)
    assert train.shape == (200, 3, 32, 32) and test.shape == (50, 3, 32, 32)
    with open(cifar_dir / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="bytes")[b"data"][0]
    assert np.array_equal(train[0].numpy().reshape(-1), first)  # channel-major, as documented


@pytest.mark.slow
def test_trains_resumes_and_redraws(cifar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data-dir", str(cifar_dir), "--out", str(out)] + TINY
    train_cifar10.main(common + ["--steps", "20"])
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 5, 10, 15, 20]
    assert metrics[-1]["nmse"] < metrics[0]["nmse"], "NMSE should fall"
    final = json.loads((out / "final.json").read_text())
    assert final["steps"] == 20 and 0 < final["test_nmse"] < 2
    for name in FIGURES:
        assert (out / name).stat().st_size > 0, name

    train_cifar10.main(common + ["--steps", "30", "--resume"])
    assert [m["step"] for m in _metrics(out)] == [1, 5, 10, 15, 20, 25, 30]
    assert _steps_logged(out) == list(range(1, 31))
    assert json.loads((out / "final.json").read_text())["steps"] == 30

    for name in FIGURES:
        (out / name).unlink()
    train_cifar10.main(["--plots-only", str(out), "--device", "cpu"])
    for name in FIGURES:
        assert (out / name).stat().st_size > 0, name
    assert f"figures of step 30 saved to {out}/: curves.png" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_is_the_same_run(cifar_dir, tmp_path):
    """20 steps, then 10 more from the step-20 checkpoint == 30 steps in one go."""
    args = ["--data-dir", str(cifar_dir)] + TINY
    train_cifar10.main(args + ["--out", str(tmp_path / "a"), "--steps", "30"])
    train_cifar10.main(args + ["--out", str(tmp_path / "b"), "--steps", "20"])
    train_cifar10.main(args + ["--out", str(tmp_path / "b"), "--steps", "30", "--resume"])
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for row_a, row_b in zip(a, b):
        assert row_a["nmse"] == pytest.approx(row_b["nmse"], rel=1e-4)


def test_missing_data_offline_says_how_to_provide_it(tmp_path):
    with pytest.raises(SystemExit, match="--data-dir.*--data photos") as error:
        train_cifar10.main(["--data", "cifar10", "--data-dir", str(tmp_path), "--out",
                            str(tmp_path / "run"), "--no-download", "--device", "cpu"])
    assert "standard library" in str(error.value) and "pip install" not in str(error.value)


def _tarball(tmp_path, members):
    """A gzipped tar of ``{name: bytes}`` and its md5."""
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_checks_the_md5_then_extracts_with_the_standard_library(cifar_dir, tmp_path):
    members = {f"cifar-10-batches-py/{name}": (cifar_dir / "cifar-10-batches-py" / name).read_bytes()
               for name in train_cifar10.TRAIN_FILES + train_cifar10.TEST_FILES}
    archive, md5 = _tarball(tmp_path, members)
    url = archive.as_uri()
    with pytest.raises(train_cifar10.DataNotFound, match="md5"):
        train_cifar10.download_cifar(tmp_path / "bad", url=url, md5="0" * 32)
    assert not (tmp_path / "bad" / archive.name).exists()  # a bad archive is not kept
    train_cifar10.download_cifar(tmp_path / "data", url=url, md5=md5)
    train, test = train_cifar10.load_cifar(tmp_path / "data", download=False)
    assert train.shape == (200, 3, 32, 32) and test.shape == (50, 3, 32, 32)
    assert train_cifar10.CIFAR_MD5 == "c58f30108f718f92721af3b95e74349a"


def test_download_refuses_an_archive_that_writes_outside_its_folder(tmp_path):
    archive, md5 = _tarball(tmp_path, {"../escaped": b"x"})
    with pytest.raises(train_cifar10.DataNotFound, match="escaped"):
        train_cifar10.download_cifar(tmp_path / "data", url=archive.as_uri(), md5=md5)
    assert not (tmp_path / "escaped").exists()


def test_photos_are_split_by_photo():
    train, test = train_cifar10.load_photos()
    assert train.dtype == test.dtype == train_cifar10.torch.uint8
    assert train.shape[1:] == test.shape[1:] == (3, 32, 32)
    assert len(train) > 10_000 and len(test) == 342  # chelsea 9 x 14 tiles, coffee 12 x 18
    from benchmarks import quality
    photos = quality.photographs()
    first_test = quality.tiles(quality.channels_first(photos[train_cifar10.TEST_PHOTOS[0]]))[0]
    assert train_cifar10.torch.equal(test[0], first_test)


def test_without_cifar_the_photos_train_and_every_output_says_not_cifar(tmp_path, capsys):
    out = tmp_path / "photos"
    model = train_cifar10.main(["--data-dir", str(tmp_path / "empty"), "--out", str(out),
                                "--steps", "12", "--log-every", "6"] + TINY[:8] + TINY[10:])
    printed = capsys.readouterr().out
    assert "CIFAR-10 is not in" in printed and "NOT CIFAR-10" in printed
    assert "device: cpu" in printed and "s/step (steps 2-11)" in printed
    assert "checkpoint saved to" in printed and "figures saved to" in printed
    final = json.loads((out / "final.json").read_text())
    assert final["data"] == "photos" and final["steps"] == 12
    assert 1 <= final["test_codes_used"] <= 32 and final["test_perplexity"] >= 1
    assert json.loads((out / "args.json").read_text())["data"] == "photos"  # resumes on the same data
    assert model is not None
    for name in FIGURES:
        assert (out / name).stat().st_size > 0, name
    assert not (out / "codebook_umap.png").exists()  # UMAP only with --umap


def test_sigterm_saves_a_checkpoint_that_resumes(cifar_dir, tmp_path, monkeypatch, capsys):
    """SIGTERM (as Ctrl-C) mid-run: the step finishes, the checkpoint is saved, the run
    stops with a line saying how to resume; --resume then finishes it."""
    out = tmp_path / "stopped"
    common = ["--data-dir", str(cifar_dir), "--out", str(out)] + TINY
    batches = {"n": 0}
    to_model_range = train_cifar10.to_model_range

    def signalled_at_step_7(images, device):
        batches["n"] += 1
        if batches["n"] == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return to_model_range(images, device)

    monkeypatch.setattr(train_cifar10, "to_model_range", signalled_at_step_7)
    with pytest.raises(SystemExit) as stopped:
        train_cifar10.main(common + ["--steps", "1000"])
    assert stopped.value.code == 143
    printed = capsys.readouterr().out
    assert "step 7: checkpoint saved to" in printed and "--resume" in printed
    state = train_cifar10.torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 7 and _steps_logged(out) == list(range(1, 8))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are given back
    monkeypatch.setattr(train_cifar10, "to_model_range", to_model_range)
    train_cifar10.main(common + ["--steps", "12", "--resume"])
    assert _steps_logged(out) == list(range(1, 13))
    assert json.loads((out / "final.json").read_text())["steps"] == 12


@pytest.mark.slow
def test_torchrun_two_processes(cifar_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(SCRIPT), "--data-dir", str(cifar_dir), "--out", str(out), "--steps", "10"] + TINY,
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in _metrics(out)] == [1, 5, 10]  # rank 0 logs alone
    assert (out / "checkpoint.pt").exists() and (out / "curves.png").exists()


@pytest.mark.slow
def test_bf16_autocast_and_plain_quantizer(cifar_dir, tmp_path):
    """--bf16 (autocast on CPU) with the seed's plain quantizer (--decay 0) trains and logs."""
    out = tmp_path / "bf16"
    train_cifar10.main(["--data-dir", str(cifar_dir), "--out", str(out), "--steps", "10", "--bf16",
                        "--decay", "0"] + TINY)
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 5, 10]
    assert all(np.isfinite([m["nmse"], m["perplexity"], m["vq_loss"]]).all() for m in metrics)


@pytest.mark.slow
def test_recipe_flags_log_codes_and_reseeds(cifar_dir, tmp_path):
    """--kmeans-init --dead-code-threshold: codes used, alive and re-seeded are logged and plotted."""
    out = tmp_path / "recipe"
    train_cifar10.main(["--data-dir", str(cifar_dir), "--out", str(out), "--steps", "10",
                        "--kmeans-init", "--dead-code-threshold", "1"] + TINY)
    metrics = _metrics(out)
    for row in metrics:
        assert 1 <= row["codes_used"] <= 32 and 0 <= row["codes_alive"] <= 32
        assert row["reseeded"] >= 0
    assert (out / "curves.png").stat().st_size > 0
    state = train_cifar10.torch.load(out / "checkpoint.pt", weights_only=True)  # tensors only
    assert state["args"]["kmeans_init"] is True and bool(state["model"]["vq.initialized"])


@pytest.mark.parametrize("flags", [
    ["--quantizer", "rvq", "--num-quantizers", "3", "--kmeans-init", "--dead-code-threshold", "1",
     "--quantize-dropout"],
    ["--quantizer", "rvq", "--num-quantizers", "2", "--groups", "2", "--cosine",
     "--codebook-dim", "4", "--rotation-trick", "--decay", "0"],
], ids=["rvq-ema-recipe", "rvq-learned-cosine"])
def test_residual_quantizer_flags(cifar_dir, tmp_path, flags):
    """--quantizer rvq trains, logs per-level statistics, and decodes its codes."""
    out = tmp_path / "rvq"
    model = train_cifar10.main(["--data-dir", str(cifar_dir), "--out", str(out), "--steps", "10"]
                               + flags + TINY)
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 5, 10]
    assert all(np.isfinite([m["nmse"], m["perplexity"], m["vq_loss"]]).all() for m in metrics)
    state = train_cifar10.torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["model"]["vq.codebooks"].shape[0] == int(flags[3]) * (2 if "--groups" in flags else 1)
    assert (out / "reconstructions.png").stat().st_size > 0


def test_multiscale_quantizer_trains_and_decodes(cifar_dir, tmp_path):
    """--quantizer multiscale (VAR's) trains with a learned codebook and one in EMA."""
    for flags in (["--decay", "0"], []):
        out = tmp_path / f"multiscale{len(flags)}"
        train_cifar10.main(["--data-dir", str(cifar_dir), "--out", str(out), "--steps", "5",
                            "--quantizer", "multiscale", "--scales", "1", "2", "4", "8"]
                           + flags + TINY)
        state = train_cifar10.torch.load(out / "checkpoint.pt", weights_only=True)["model"]
        assert bool(state["vq.initialized"]) and ("vq.ema_cluster_size" in state) == (not flags)
        assert state["vq._extra_state"]["quantizer"] == "MultiScaleResidualVQ"
        metrics = _metrics(out)
        assert all(np.isfinite([m["nmse"], m["perplexity"], m["vq_loss"]]).all() for m in metrics)
        assert (out / "reconstructions.png").stat().st_size > 0
    args = train_cifar10.build_parser().parse_args(["--quantizer", "multiscale", "--cosine"])
    with pytest.raises(SystemExit, match="--cosine: not options of --quantizer multiscale"):
        train_cifar10.resolve_codebook_options(args)


class _Payload:
    """Stands for code someone hid in a checkpoint: unpickling would construct it."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_crafted_checkpoint_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    import torch
    torch.save({"model": {}, "args": {}, "payload": _Payload()}, run / "checkpoint.pt")
    with pytest.raises(SystemExit, match="refused"):
        train_cifar10.main(["--plots-only", str(run), "--device", "cpu"])


def test_plots_only_on_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint.pt in"):
        train_cifar10.main(["--plots-only", str(tmp_path / "nowhere")])


def test_collapse_warning_fires_once():
    watch = train_cifar10.CollapseWatch(steps=200, level=2.0)
    messages = [watch.update(step, perplexity) for step, perplexity in
                [(100, 5.0), (200, 1.1), (300, 1.2), (400, 1.0), (500, 1.0), (600, 1.0)]]
    assert [m is not None for m in messages] == [False, False, False, True, False, False]
    assert "k-means init" in messages[3] and "defaults" in messages[3]


@pytest.mark.parametrize("flags, advice", [
    ([], "--dead-code-threshold 0.5"),  # the EMA quantizer's default, not 1
    (["--decay", "0"], "--dead-code-threshold 1"),
    (["--quantizer", "rvq", "--decay", "0"], "learned residual codebooks do not re-seed"),
])
def test_collapse_warning_names_this_quantizers_defaults(flags, advice):
    args = train_cifar10.build_parser().parse_args(flags + ["--original-algorithm"])
    train_cifar10.resolve_codebook_options(args)
    watch = train_cifar10.CollapseWatch(steps=1, advice=train_cifar10.collapse_advice(args))
    watch.update(1, 1.0)
    assert advice in watch.update(2, 1.0)


@pytest.mark.parametrize("flags, expected", [
    ([], (True, 0.5)),  # the EMA quantizer's default
    (["--decay", "0"], (True, 1.0)),  # the learned codebook re-seeds too
    (["--quantizer", "rvq"], (True, 1.0)),
    (["--quantizer", "rvq", "--decay", "0"], (True, 0.0)),
    (["--quantizer", "multiscale"], (True, 0.5)),
    (["--quantizer", "multiscale", "--decay", "0"], (True, 0.0)),
    (["--original-algorithm"], (False, 0.0)),
    (["--no-kmeans-init", "--dead-code-threshold", "2"], (False, 2.0)),
])
def test_codebook_options_default_to_kmeans_and_reseeding(flags, expected):
    args = train_cifar10.build_parser().parse_args(flags)
    train_cifar10.resolve_codebook_options(args)
    vq = train_cifar10.build_model(args).vq
    assert (vq.kmeans_init, vq.dead_code_threshold) == expected


def test_reseeding_a_learned_residual_codebook_is_refused_in_one_line():
    args = train_cifar10.build_parser().parse_args(["--quantizer", "rvq", "--decay", "0",
                                                    "--dead-code-threshold", "1"])
    with pytest.raises(SystemExit, match="learned residual codebooks do not re-seed"):
        train_cifar10.resolve_codebook_options(args)


@pytest.mark.slow
def test_resume_takes_the_recipe_step_count_and_time_from_the_checkpoint(cifar_dir, tmp_path):
    out = tmp_path / "recipe-resume"
    common = ["--data-dir", str(cifar_dir), "--out", str(out)]
    train_cifar10.main(common + ["--steps", "10", "--kmeans-init", "--dead-code-threshold", "1",
                                 "--num-embeddings", "24"] + TINY[:8] + TINY[10:])
    seconds_before = _metrics(out)[-1]["seconds"]
    # no recipe flags: kmeans_init, the threshold and K come from the checkpoint
    train_cifar10.main(["--out", str(out), "--resume", "--steps", "15"])
    saved = json.loads((out / "args.json").read_text())
    assert saved["kmeans_init"] is True and saved["dead_code_threshold"] == 1.0
    assert saved["num_embeddings"] == 24 and saved["steps"] == 15
    rows = _metrics(out)
    assert [m["step"] for m in rows] == [1, 5, 10, 15]
    assert rows[-1]["seconds"] > seconds_before  # the elapsed time goes on
    # without --steps: the checkpoint's total, nothing left to do (not the default 200,000)
    train_cifar10.main(["--out", str(out), "--resume"])
    assert json.loads((out / "final.json").read_text())["steps"] == 15


def test_resume_refuses_a_contradicting_recipe_flag(cifar_dir, tmp_path):
    out = tmp_path / "clash"
    out.mkdir()
    state = {"args": {"num_embeddings": 32, "kmeans_init": True, "lr": 1e-3, "steps": 10}}
    train_cifar10.torch.save(state, out / "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"--num-embeddings 64 \(the checkpoint has 32\)"):
        train_cifar10.main(["--out", str(out), "--resume", "--num-embeddings", "64"])


@pytest.mark.parametrize("n", [3, 10, 150, 1000, 250_000])
def test_smoothing_fits_any_length_and_stays_in_the_data_range(n):
    rng = np.random.default_rng(0)
    raw = np.abs(rng.normal(1.0, 0.5, n)) + np.linspace(1, 0, n)
    raw[n // 2] = 30.0  # a spike
    smoothed = train_cifar10.smooth(raw)
    assert smoothed.shape == raw.shape
    assert smoothed.min() >= raw.min() and smoothed.max() <= raw.max()
