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


def test_summary_counts_collapsed_runs_and_medians():
    runs = [{"config": "a", "collapsed": c, "test_nmse": v, "train_nmse": v, "train_perplexity": 1,
             "test_perplexity": 1, "codes_used_test": 1, "dead_codes": 0, "seconds_per_step": 1}
            for c, v in ((True, 1.0), (False, 0.1), (False, 0.2))]
    entry = quality.summarize(runs)["a"]
    assert entry["collapsed"] == 1 and entry["seeds"] == 3
    assert entry["test_nmse"]["median"] == 0.2


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
    assert set(report["summary"]) >= {"original", "vqfast-original-args", "vqfast", "plain",
                                      "residual"}
    for run in report["runs"]:
        assert run["steps"] == 30 and run["curve"][-1]["step"] == 30
        assert 0 < run["test_nmse"] < 10
        levels = 4 if run["config"].endswith("residual") else 1
        assert len(run["codes_used_test_per_level"]) == levels
        assert run["collapsed"] == (min(run["codes_used_test_per_level"]) <= 0.02 * 32)
    for entry in report["summary"].values():
        assert 0 <= entry["collapsed"] <= entry["seeds"] and "median" in entry["test_nmse"]
    table = (tmp_path / "q.md").read_text()
    assert "| residual |" in table and "collapsed runs" in table
    for name in ("q-curves.png", "q-grid.png"):
        assert (tmp_path / name).stat().st_size > 0
