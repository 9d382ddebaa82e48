"""The GPU command cannot rot: its dry run (same parts, CPU, tiny) runs here."""

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from benchmarks.gpu import report

REPO = Path(__file__).resolve().parents[1]
FILES = ["env.json", "tests.xml", "tests.log", "bench.json", "bench.md", "bench.png",
         "train.json", "SUMMARY.md"]


@pytest.mark.slow
def test_dry_run_writes_every_file(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--dry-run", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # 8: what a lent GPU returns
    environment = json.loads((out / "env.json").read_text())
    for key in ("gpu", "sm_count", "driver", "cuda_runtime", "torch", "triton", "numpy", "python",
                "vqfast_commit"):
        assert key in environment, key
    junit = ET.parse(out / "tests.xml").getroot()
    assert int(junit.find("testsuite").get("tests")) > 0
    bench = json.loads((out / "bench.json").read_text())
    assert {r["impl"] for r in bench["results"] if r["median_ms"]} >= {"reference", "vqfast[torch]"}
    assert {r["quantizer"] for r in bench["lookup_free"]
            if r["impl"] == "vqfast (exact)" and r["median_ms"]} == {"lfq", "bsq"}
    assert any(r["impl"] == "vqfast" and r["median_ms"] for r in bench["residual"])
    assert any(r["impl"] == "vqfast encode" and r["vectors_per_s"] for r in bench["encode"])
    assert {r["sem"] for r in bench["atomics"] if r["median_ms"]} == {"relaxed", "acq_rel"}
    assert any(r["impl"] == "vqfast" and r["median_ms"] for r in bench["sim_vq"])
    assert any(r["impl"] == "vqfast (streamed)" and r["median_ms"] for r in bench["ibq"])
    assert any(r["impl"] == "vqfast" and r["median_ms"] for r in bench["multiscale"])
    assert {r["case"] for r in bench["residual_lookup_free"]
            if r["impl"] == "vqfast" and r["median_ms"]} == {"audio codec FSQ", "tokenizer LFQ"}
    failed = [r for part in ("results", "lookup_free", "residual", "atomics", "encode", "sim_vq",
                             "ibq", "residual_lookup_free", "multiscale")
              for r in bench[part]
              if (r["skipped"] or "").startswith("error")]
    assert failed == [], failed  # a case that raised (not one skipped for a missing peer)
    assert "Lookup-free" in (out / "bench.md").read_text()
    train = json.loads((out / "train.json").read_text())
    assert train["failed"] == [] and train["parts"]["eager"]["steps_per_s"] > 0
    assert "summary_line" in train["parts"]["quality"]  # the second invocation added its part
    summary = (out / "SUMMARY.md").read_text()
    assert "all parts passed" in summary and "| bench | 0 |" in summary
    assert "of a 420 s budget" in summary and "Predicted (benchmarks/gpu/PREDICTION.md)" in summary


def test_part_limits_fit_the_default_budget():
    script = (REPO / "benchmarks/gpu/run.sh").read_text()
    limits = re.findall(r"^run_part (\w+) (\d+) ", script, flags=re.M)
    assert [name for name, _ in limits] == ["install", "correctness", "bench", "train", "family",
                                            "quality"]
    assert sum(int(limit) for _, limit in limits) <= 420 == int(re.search(r"^budget=(\d+)", script, re.M).group(1))


def test_a_run_out_of_budget_still_writes_its_summary(tmp_path):
    """With 20 s only the install part runs; the others are skipped and the summary says so."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--dry-run", "--budget", "20",
                           str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "skipped for time: correctness, bench, train, family, quality" in summary
    assert "| install | 0 |" in summary and (tmp_path / "env.json").exists()


def test_summary_puts_measurements_beside_predictions(tmp_path):
    rows = [dict(shape="vqvae", op="ema_step", dtype="bfloat16", impl=impl, median_ms=ms, peak_mib=1.0)
            for impl, ms in (("vqfast[triton]", 0.1), ("reference", 0.5))]
    atomics = [dict(shape="large", dtype="bfloat16", sem="acq_rel", median_ms=1.3, vs_relaxed=1.3)]
    (tmp_path / "bench.json").write_text(json.dumps({"results": rows, "atomics": atomics}))
    text = report.summary(tmp_path, {"bench": {"rc": 0, "seconds": 80, "limit": 90}}, budget=420)
    assert "| VQ-VAE shape EMA step, bf16, eager | 0.2 ms | 0.1 ms | faster than predicted (0.50x" in text
    assert "| 2 x | 5 x | above the prediction" in text
    assert "1.3 x | above the prediction (1.08x)" in text
    assert "| large EMA step, bf16 | 1.05 ms | not measured |" in text


def test_usage_error_without_out_dir():
    proc = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--dry-run"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_summary_names_the_failed_parts(tmp_path):
    (tmp_path / "env.json").write_text(json.dumps({"gpu": "H100", "torch": "2.11"}))
    text = report.summary(tmp_path, {"install": 0, "tests": 1, "bench": 124, "train": 0,
                                     "quality": "skipped"})
    assert text.startswith("# vqfast GPU run: FAILED: tests, bench (skipped for time: quality)")
    assert "no tests.xml" in text and "no bench.json" in text
