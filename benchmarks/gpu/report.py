"""The GPU command's bookkeeping: ``env.json`` before the parts, ``SUMMARY.md`` after.

    python -m benchmarks.gpu.report env OUT_DIR
    python -m benchmarks.gpu.report summary OUT_DIR --budget 420 --part correctness=0:95:110 ...

A part is ``NAME=EXIT:SECONDS:LIMIT`` (``NAME=skipped:0:0`` when the budget ran out first).
The summary holds each main figure measured beside its prediction in
``benchmarks/gpu/PREDICTION.md`` (its "Main figures" table), in words.
"""

import argparse
import datetime
import importlib.metadata
import json
import platform
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from . import compile_log

REPO = Path(__file__).resolve().parents[2]
PREDICTION = Path(__file__).with_name("PREDICTION.md")


def _version(distribution: str):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout)"


def environment() -> dict:
    import torch
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "vector_quantize_pytorch": _version("vector-quantize-pytorch"),
        "vqfast": _version("vqfast"),
        "vqfast_commit": _git_commit(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_runtime": torch.version.cuda,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sm_count=props.multi_processor_count,
                   compute_capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1))
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            env["driver"] = "unknown (no nvidia-smi)"
    else:
        env.update(gpu=None, sm_count=None, driver=None)
    return env


def _tests(out: Path) -> str:
    path = out / "tests.xml"
    if not path.exists():
        return "no tests.xml"
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    totals = {key: sum(int(s.get(key, 0)) for s in suites)
              for key in ("tests", "failures", "errors", "skipped")}
    passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    lines = [f"{passed} passed, {totals['failures']} failed, {totals['errors']} errors, "
             f"{totals['skipped']} skipped (of {totals['tests']})"]
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            problem = case.find(kind)
            if problem is not None:
                message = (problem.get("message") or "").splitlines()[:1]
                lines.append(f"  - {kind}: `{case.get('classname')}::{case.get('name')}` "
                             f"{message[0][:200] if message else ''}")
    return "\n".join(lines[:40])


# Dense peaks per GPU (TFLOP/s by dtype, HBM TB/s): bf16/fp16 tensor cores, fp32 on CUDA cores.
PEAKS = {"H100": ({"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}, 3.35),
         "H200": ({"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}, 4.8)}


def _peaks(device_name: str | None):
    return next((peak for key, peak in PEAKS.items() if key in (device_name or "")), None)


def _share(r, peaks) -> str:
    """The row's TFLOP/s and GB/s as shares of the device's peaks."""
    if not peaks or not r.get("tflops"):
        return ""
    flops, bandwidth = peaks
    return (f"{100 * r['tflops'] / flops[r['dtype']]:.0f}% / "
            f"{100 * (r.get('gbps') or 0) / (bandwidth * 1e3):.0f}%")


def _bench(out: Path) -> str:
    path = out / "bench.json"
    if not path.exists():
        return "no bench.json"
    report = json.loads(path.read_text())
    results = report["results"]
    peaks = _peaks(report.get("environment", {}).get("device"))
    by = {(r["shape"], r["op"], r["dtype"], r["impl"]): r for r in results}
    lines = ["| shape | op | dtype | vqfast ms | vs reference | vs vector-quantize-pytorch | peak MiB (vqfast / ref) | % of peak FLOP/s / HBM |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for (shape, op, dtype, impl), r in by.items():
        if not impl.startswith("vqfast") or r["median_ms"] is None:
            continue
        if impl == "vqfast[torch]" and (by.get((shape, op, dtype, "vqfast[triton]"))
                                        or {}).get("median_ms"):
            continue  # on a GPU the main row is the Triton path
        ref = by.get((shape, op, dtype, "reference"), {})
        peer = by.get((shape, op, dtype, "vector-quantize-pytorch"), {})
        vs_ref = f"{ref['median_ms'] / r['median_ms']:.1f}x" if ref.get("median_ms") else "n/a"
        vs_peer = (f"{peer['median_ms'] / r['median_ms']:.1f}x" if peer.get("median_ms")
                   else f"n/a ({(peer.get('skipped') or 'not run')[:40]})")
        ref_mem = f"{ref['peak_mib']:.0f}" if ref.get("peak_mib") is not None else "n/a"
        lines.append(f"| {shape} | {op} | {dtype} | {r['median_ms']:.3f} ({impl}) | {vs_ref} | "
                     f"{vs_peer} | {r['peak_mib']:.0f} / {ref_mem} | {_share(r, peaks)} |")
    errors = [f"  - {r['shape']} {r['op']} {r['dtype']} {r['impl']}: {r['skipped']}"
              for r in results if (r.get("skipped") or "").startswith("error")]
    residual = json.loads(path.read_text()).get("residual", [])
    if residual:
        lines += ["", "| residual case | implementation | fwd+bwd ms | peak MiB | vs vector-quantize-pytorch |",
                  "|---|---|---:|---:|---:|"]
        for r in residual:
            if r["median_ms"] is None:
                lines.append(f"| {r['case']} | {r['impl']} | {r['skipped'][:60]} | | |")
                continue
            speedup = f"{r['speedup_vs_peer']:.1f}x" if r.get("speedup_vs_peer") else "n/a"
            lines.append(f"| {r['case']} | {r['impl']} | {r['median_ms']:.2f} | "
                         f"{r['peak_mib']:.0f} | {speedup} |")
        errors += [f"  - {r['case']} {r['impl']}: {r['skipped']}" for r in residual
                   if (r.get("skipped") or "").startswith("error")]
    return "\n".join(lines + (["", "Errors:"] + errors if errors else []))


def _train(out: Path) -> str:
    path = out / "train.json"
    if not path.exists():
        return "no train.json"
    report = json.loads(path.read_text())
    parts = report["parts"]
    lines = [f"{report['model']}, batch {report['batch_size']} on {report['device']}:"]
    for name in ("eager", "compiled", "cuda_graph"):
        part = parts.get(name, {})
        value = (f"{part['steps_per_s']:.1f} steps/s" if "steps_per_s" in part
                 else part.get("skipped") or part.get("error", "not run"))
        if "step_ms" in part:
            value += (f" ({part['step_ms']:.3f} ms, the median of {part['timed_steps']} steps "
                      f"after {part['warmup_steps']} warm-up steps)")
        lines.append(f"- {name}: {value}")
    share = parts.get("quantizer_share", {})
    if "quantizer_share" in share:
        lines.append(f"- quantizer: {share['quantizer_ms']:.3f} ms of a {share['step_ms']:.3f} ms "
                     f"step ({100 * share['quantizer_share']:.1f}%)")
        if "quantizer_host_us" in share:
            lines.append(f"- quantizer step's host cost (thread CPU time to issue it): "
                         f"{share['quantizer_host_us']:.0f} us beside its "
                         f"{1e3 * share['quantizer_ms']:.0f} us")
    launches = parts.get("launches", {})
    if "kernels_per_step" in launches:
        lines.append(f"- kernels per quantizer training step: {launches['kernels_per_step']}")
    graph = parts.get("cuda_graph", {})
    if "max_relative_loss_difference" in graph:
        lines.append(f"- CUDA graph vs eager, max relative loss difference: "
                     f"{graph['max_relative_loss_difference']:.2e}")
    sync = parts.get("no_host_sync", {})
    lines.append(f"- eager step under sync debug mode 'error': "
                 f"{'passed' if sync.get('passed') else sync.get('skipped') or sync.get('error', 'not run')}")
    quality = parts.get("quality", {})
    if "summary_line" in quality:
        lines.append(f"- quality on real photographs: {quality['summary_line']}")
    if report.get("failed"):
        lines.append(f"- failed: {', '.join(report['failed'])}")
    return "\n".join(lines)


def predictions(path: Path = PREDICTION) -> list:
    """The rows ``(id, figure, predicted, unit)`` of PREDICTION.md's "Main figures" table."""
    rows, inside = [], False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            inside = line.strip() == "## Main figures"
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if inside and len(cells) == 4 and cells[0] not in ("id", "") and not cells[0].startswith("-"):
            rows.append((cells[0], cells[1], float(cells[2]), cells[3]))
    return rows


def _load(out: Path, name: str) -> dict:
    path = out / name
    return json.loads(path.read_text()) if path.exists() else {}


def _bench_ms(bench, shape, op, dtype, impl):
    for r in bench.get("results", []):
        if (r["shape"], r["op"], r["dtype"], r["impl"]) == (shape, op, dtype, impl) and r["median_ms"]:
            return r["median_ms"]
    return None


def _ratio(a, b):
    return a / b if a and b else None


def measured(out: Path) -> dict:
    """Each main figure's id -> its value in this run (absent if not measured)."""
    bench, train = _load(out, "bench.json"), _load(out, "train.json")
    ms = lambda shape, dtype, impl="vqfast[triton]": _bench_ms(bench, shape, "ema_step", dtype, impl)  # noqa: E731
    values = {
        "vqvae-ema-bf16-ms": ms("vqvae", "bfloat16"),
        "vqvae-ema-fp32-ms": ms("vqvae", "float32"),
        "vqvae-ema-bf16-vs-reference": _ratio(ms("vqvae", "bfloat16", "reference"), ms("vqvae", "bfloat16")),
        "vqvae-ema-bf16-vs-vqp": _ratio(ms("vqvae", "bfloat16", "vector-quantize-pytorch"), ms("vqvae", "bfloat16")),
        "large-ema-bf16-ms": ms("large", "bfloat16"),
        "large-ema-fp32-ms": ms("large", "float32"),
        "large-ema-bf16-vs-reference": _ratio(ms("large", "bfloat16", "reference"), ms("large", "bfloat16")),
        "kernels-per-ema-step": train.get("parts", {}).get("launches", {}).get("kernels_per_step"),
    }
    for row in bench.get("atomics", []):
        if row["shape"] == "large" and row["dtype"] == "bfloat16" and row["sem"] == "acq_rel":
            values["large-ema-bf16-acq_rel-vs-relaxed"] = row["vs_relaxed"]
    for row in bench.get("residual", []):
        if row["case"] == "codec" and row["impl"] == "vqfast" and row.get("matmul", "fp32") == "fp32":
            values["codec-rvq-fp32-ms"] = row["median_ms"]
            values["codec-rvq-fp32-vs-vqp"] = row.get("speedup_vs_peer")
    return {k: v for k, v in values.items() if v is not None}


def _verdict(unit: str, predicted: float, value: float) -> str:
    if unit == "ms":  # a time: lower is faster
        word = "faster" if value < predicted else "slower"
        return f"{word} than predicted ({value / predicted:.2f}x the predicted time)"
    if unit == "x":  # a speedup (or a slowdown factor): higher means the first is slower
        return f"{'above' if value > predicted else 'below'} the prediction ({value / predicted:.2f}x)"
    return "as predicted" if value == predicted else f"{'more' if value > predicted else 'fewer'} than predicted"


def predicted_vs_measured(out: Path) -> str:
    values = measured(out)
    lines = ["| figure | predicted | measured | verdict |", "|---|---:|---:|---|"]
    for key, figure, predicted, unit in predictions():
        value = values.get(key)
        shown = f"{value:.3g} {unit}" if value is not None else "not measured"
        verdict = _verdict(unit, predicted, value) if value is not None else ""
        lines.append(f"| {figure} | {predicted:g} {unit} | {shown} | {verdict} |")
    return "\n".join(lines)


def _part(value):
    """``rc`` or ``{"rc", "seconds", "limit"}`` (``rc`` "skipped" when the budget ran out)."""
    return value if isinstance(value, dict) else {"rc": value, "seconds": None, "limit": None}


def summary(out: Path, parts: dict, budget: int | None = None) -> str:
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    parts = {name: _part(value) for name, value in parts.items()}
    failed = [name for name, p in parts.items() if p["rc"] not in (0, "skipped")]
    skipped = [name for name, p in parts.items() if p["rc"] == "skipped"]
    head = "all parts passed" if not failed else f"FAILED: {', '.join(failed)}"
    if skipped:
        head += f" (skipped for time: {', '.join(skipped)})"
    spent = sum(p["seconds"] or 0 for p in parts.values())
    lines = [
        f"# vqfast GPU run: {head}",
        "",
        f"{env.get('gpu') or 'no GPU (dry run on CPU)'} · SMs {env.get('sm_count')} · driver "
        f"{env.get('driver')} · CUDA {env.get('cuda_runtime')} · torch {env.get('torch')} · "
        f"triton {env.get('triton')} · numpy {env.get('numpy')} · Python {env.get('python')} · "
        f"vector-quantize-pytorch {env.get('vector_quantize_pytorch')} · vqfast "
        f"{env.get('vqfast_commit')} · {env.get('date')}",
        "",
        f"Parts took {spent} s" + (f" of a {budget} s budget." if budget else "."),
        "",
        "| part | exit code | seconds | limit | file |",
        "|---|---:|---:|---:|---|",
    ]
    files = {"install": "env.json", "precompile": "precompile.log", "correctness": "tests.xml, tests.log",
             "bench": "bench.json, bench.md, bench.png", "train": "train.json",
             "family": "bench.json, bench.md", "quality": "train.json"}
    for name, p in parts.items():
        lines.append(f"| {name} | {p['rc']} | {p['seconds'] if p['seconds'] is not None else ''} | "
                     f"{p['limit'] or ''} | {files.get(name, '')} |")
    lines += ["", "## Predicted (benchmarks/gpu/PREDICTION.md) vs measured", "",
              predicted_vs_measured(out), "",
              "## Tests on the device", "", _tests(out), "",
              "## Triton kernel builds, by part (compiles.jsonl)", "",
              compile_log.markdown(out / "compiles.jsonl"), "",
              "## Main ratios (one run, side by side)", "", _bench(out), "",
              "## Training step", "", _train(out), ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["env", "summary"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--part", action="append", default=[], metavar="NAME=RC:SECONDS:LIMIT",
                        help="a part's name, exit code (or 'skipped'), seconds taken and limit")
    parser.add_argument("--budget", type=int, default=None, help="the run's budget in seconds")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "env":
        (args.out / "env.json").write_text(json.dumps(environment(), indent=1))
        return 0
    parts = {}
    for item in args.part:
        name, fields = item.split("=", 1)
        rc, seconds, limit = (fields.split(":") + [None, None])[:3]
        parts[name] = {"rc": rc if rc == "skipped" else int(rc),
                       "seconds": int(seconds) if seconds else None,
                       "limit": int(limit) if limit else None}
    (args.out / "SUMMARY.md").write_text(summary(args.out, parts, args.budget))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
