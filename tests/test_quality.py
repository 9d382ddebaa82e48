"""The quality benchmark's pipeline (--quick: tiny model, few steps; checks, not numbers)."""

import json

import pytest
import torch

from benchmarks import quality


def test_crops_split_train_and_test_by_region():
    crops = quality.load_crops()
    assert len(crops.train_regions) >= 8 and crops.test.shape[1:] == (3, 32, 32)
    assert len(crops.test) > 500 and 0.01 < crops.variance < 0.1
    assert float(crops.test.min()) >= -0.5 and float(crops.test.max()) <= 0.5
    first = next(quality.batches(crops, 4, 1, seed=3))
    again = next(quality.batches(crops, 4, 1, seed=3))
    assert torch.equal(first, again)  # the same data order for every configuration


def test_original_config_starts_from_vqfast_init():
    args = quality.parse_args(["--quick"])
    original = quality.build("original", args, seed=5)
    ours = quality.build("vqfast", args, seed=5)
    assert torch.equal(original.vq._embedding.weight, ours.vq.codebook)
    assert torch.equal(original.encoder._conv_1.weight, ours.encoder._conv_1.weight)


@pytest.mark.slow
def test_quick_run_writes_json_table_and_figures(tmp_path):
    quality.main(["--quick", "--out", str(tmp_path), "--name", "q"])
    report = json.loads((tmp_path / "q.json").read_text())
    assert set(report["summary"]) >= {"original", "vqfast", "vqfast+recipe", "plain"}
    for run in report["runs"]:
        assert run["steps"] == 30 and run["curve"][-1]["step"] == 30
        assert 0 < run["test_nmse"] < 10
    assert "| vqfast+recipe |" in (tmp_path / "q.md").read_text()
    for name in ("q-curves.png", "q-grid.png"):
        assert (tmp_path / name).stat().st_size > 0
