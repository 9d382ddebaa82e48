"""The GPU command cannot rot: its dry run (same parts, CPU, tiny) runs here."""

import json
import os
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
    assert any(r["impl"] == "vqfast (exact)" and r["median_ms"] for r in bench["lookup_free"])
    assert any(r["impl"] == "vqfast" and r["median_ms"] for r in bench["residual"])
    failed = [r for part in ("results", "lookup_free", "residual") for r in bench[part]
              if (r["skipped"] or "").startswith("error")]
    assert failed == [], failed  # a case that raised (not one skipped for a missing peer)
    assert "Lookup-free" in (out / "bench.md").read_text()
    train = json.loads((out / "train.json").read_text())
    assert train["failed"] == [] and train["parts"]["eager"]["steps_per_s"] > 0
    summary = (out / "SUMMARY.md").read_text()
    assert "all parts passed" in summary and "| bench | 0 |" in summary


def test_usage_error_without_out_dir():
    proc = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--dry-run"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_summary_names_the_failed_parts(tmp_path):
    (tmp_path / "env.json").write_text(json.dumps({"gpu": "H100", "torch": "2.11"}))
    text = report.summary(tmp_path, {"install": 0, "tests": 1, "bench": 124, "train": 0})
    assert text.startswith("# vqfast GPU run: FAILED: tests, bench")
    assert "no tests.xml" in text and "no bench.json" in text
