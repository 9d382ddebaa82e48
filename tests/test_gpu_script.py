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
FILES = ["env.json", "cache.log", "precompile.log", "compiles.jsonl", "tests.xml", "tests.log", "bench.json", "bench.md", "bench.png",
         "train.json", "SUMMARY.md"]
# (cache: the dry run's check of a carried Triton cache built here, only where there is one)
PARTS = ("install", "precompile", "correctness", "bench", "train", "family", "quality", "cache")
GPU_PARTS = set(PARTS) - {"cache"}
PART_FILES = {"install": ["env.json", "cache.log"], "precompile": ["precompile.log", "compiles.jsonl"],
              "correctness": ["tests.xml", "tests.log"],
              "bench": ["bench.json", "bench.md", "bench.png"], "train": ["train.json"],
              "family": ["bench.json", "bench.md"], "quality": ["train.json"],
              "cache": ["cache.log"]}
# timeout(1)'s exit codes for a part cut at its limit (SIGINT, then SIGKILL 10 s later)
TIMED_OUT = ("124", "137")


def dry_run(out, *options, python=sys.executable, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = str(python)
    return subprocess.run(["bash", "benchmarks/gpu/run.sh", "--dry-run", *options, str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def finished_parts(out, proc):
    """The parts that ran to their end, read from the run's SUMMARY.md (which must be
    written). Every part passed, was skipped for the budget, or was cut at its time limit
    (a loaded machine: no test asserts how long a part takes); the exit code is 1 exactly
    when one was cut. Returns ``(finished part names, summary text)``."""
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert (out / "SUMMARY.md").exists(), log
    summary = (out / "SUMMARY.md").read_text()
    codes = {name: rc for name, rc in re.findall(r"^\| (\w+) \| (\w+) \|[^|]*\|[^|]*\|[^|]*\|$",
                                                 summary, flags=re.M)  # (the parts' table)
             if name in PARTS}
    assert list(codes) == [p for p in PARTS if p in codes] and codes, summary
    assert all(rc in ("0", "skipped", *TIMED_OUT) for rc in codes.values()), summary + log
    cut = [name for name, rc in codes.items() if rc in TIMED_OUT]
    assert proc.returncode == (1 if cut else 0), log
    finished = {name for name, rc in codes.items() if rc == "0"}
    written = {p.name for p in out.iterdir()}
    assert written >= {f for name in finished for f in PART_FILES[name]} | {"SUMMARY.md"}, written
    return finished, summary


@pytest.mark.slow
def test_dry_run_writes_every_file(tmp_path):
    """What each finished part wrote (a part a loaded machine cut at its limit is reported,
    not failed here); with every part finished, the files a GPU run returns."""
    out = tmp_path / "out"
    proc = dry_run(out)
    done, summary = finished_parts(out, proc)
    assert "of a 420 s budget" in summary and "Predicted (benchmarks/gpu/PREDICTION.md)" in summary
    if done >= GPU_PARTS:
        assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
        assert "all parts passed" in summary and "| bench | 0 |" in summary
    if "install" in done:
        environment = json.loads((out / "env.json").read_text())
        for key in ("gpu", "sm_count", "driver", "cuda_runtime", "torch", "triton", "numpy",
                    "python", "vqfast_commit"):
            assert key in environment, key
    if "precompile" in done:  # every launch of the VQ-VAE steps hit the cache it built
        log = (out / "precompile.log").read_text()
        hits = re.search(r"cache check: (\d+) of (\d+) launches hit the cache", log)
        assert hits and hits.group(1) == hits.group(2) and int(hits.group(2)) >= 6, log
        # ... into a cache of its own: every build compiled, logged under its part
        builds = [json.loads(line) for line in (out / "compiles.jsonl").read_text().splitlines()]
        compiled = [b for b in builds if b["part"] == "precompile" and not b["cache_hit"]]
        assert len(compiled) == int(hits.group(2)), builds
        assert f"| precompile | {len(compiled)} |" in (out / "SUMMARY.md").read_text()
    if "correctness" in done:
        junit = ET.parse(out / "tests.xml").getroot()
        assert int(junit.find("testsuite").get("tests")) > 0
    bench = json.loads((out / "bench.json").read_text()) if {"bench", "family"} & done else {}
    if "bench" in done:
        assert {r["impl"] for r in bench["results"] if r["median_ms"]} >= {"reference",
                                                                            "vqfast[torch]"}
        assert {r["sem"] for r in bench["atomics"] if r["median_ms"]} == {"relaxed", "acq_rel"}
    if "family" in done:
        _check_family(bench, out)
    failed = [r for part in ("results", "lookup_free", "residual", "atomics", "encode", "sim_vq",
                             "ibq", "residual_lookup_free", "multiscale")
              for r in bench.get(part, [])
              if (r["skipped"] or "").startswith("error")]
    assert failed == [], failed  # a case that raised (not one skipped for a missing peer)
    if "train" in done:
        train = json.loads((out / "train.json").read_text())
        assert train["failed"] == [] and train["parts"]["eager"]["steps_per_s"] > 0
        if "quality" in done:
            assert "summary_line" in train["parts"]["quality"]  # the second invocation's part


def _check_family(bench, out):
    assert {r["quantizer"] for r in bench["lookup_free"]
            if r["impl"] == "vqfast (exact)" and r["median_ms"]} == {"lfq", "bsq"}
    assert any(r["impl"] == "vqfast" and r["median_ms"] for r in bench["residual"])
    assert any(r["impl"] == "vqfast encode" and r["vectors_per_s"] for r in bench["encode"])
    assert any(r["impl"] == "vqfast" and r["median_ms"] for r in bench["sim_vq"])
    assert any(r["impl"] == "vqfast (streamed)" and r["median_ms"] for r in bench["ibq"])
    assert any(r["impl"] == "vqfast" and r["median_ms"] for r in bench["multiscale"])
    assert {r["case"] for r in bench["residual_lookup_free"]
            if r["impl"] == "vqfast" and r["median_ms"]} == {"audio codec FSQ", "tokenizer LFQ"}
    assert "Lookup-free" in (out / "bench.md").read_text()
    patched = [r for r in bench["patched"] if not r["skipped"]]
    assert patched and all(r["codes_equal"] and r["patched_ms"] for r in patched)
    codecs = [r for r in bench["codecs"] if not r["skipped"]]
    assert codecs and all(r["vqfast_ms"] and r["codes_equal"] is not False for r in codecs)


def test_part_limits_fit_the_default_budget():
    script = (REPO / "benchmarks/gpu/run.sh").read_text()
    limits = re.findall(r"^run_part (\w+) (\d+) ", script, flags=re.M)
    assert [name for name, _ in limits] == ["install", "precompile", "correctness", "bench",
                                            "train", "family", "quality"]
    assert sum(int(limit) for _, limit in limits) <= 420 == int(re.search(r"^budget=(\d+)", script, re.M).group(1))


def test_a_run_out_of_budget_still_writes_its_summary(tmp_path):
    """With 20 s only the install part runs (to its end, or cut at its limit on a loaded
    machine); the others are skipped and the summary says so."""
    proc = dry_run(tmp_path, "--budget", "20", timeout=300)
    finished_parts(tmp_path, proc)
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "skipped for time: precompile, correctness, bench, train, family, quality" in summary


def test_summary_puts_measurements_beside_predictions(tmp_path):
    rows = [dict(shape="vqvae", op="ema_step", dtype="bfloat16", impl=impl, median_ms=ms, peak_mib=1.0)
            for impl, ms in (("vqfast[triton]", 0.1), ("reference", 0.5))]
    atomics = [dict(shape="large", dtype="bfloat16", sem="acq_rel", median_ms=1.3, vs_relaxed=1.3)]
    (tmp_path / "bench.json").write_text(json.dumps({"results": rows, "atomics": atomics}))
    text = report.summary(tmp_path, {"bench": {"rc": 0, "seconds": 80, "limit": 90}}, budget=420)
    assert "| VQ-VAE shape EMA step, bf16, eager | 0.2 ms | 0.1 ms | faster than predicted (0.50x" in text
    assert "| 2 x | 5 x | above the prediction" in text
    assert "1.3 x | above the prediction (1.08x)" in text
    large = next(p[2] for p in report.predictions() if p[0] == "large-ema-bf16-ms")
    assert f"| large EMA step, bf16 | {large:g} ms | not measured |" in text


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
