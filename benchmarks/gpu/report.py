"""The GPU command's bookkeeping: ``env.json`` before the parts, ``SUMMARY.md`` after.

    python -m benchmarks.gpu.report env OUT_DIR
    python -m benchmarks.gpu.report summary OUT_DIR --part tests=0 --part bench=1 ...
"""

import argparse
import datetime
import importlib.metadata
import json
import platform
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


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


def _bench(out: Path) -> str:
    path = out / "bench.json"
    if not path.exists():
        return "no bench.json"
    results = json.loads(path.read_text())["results"]
    by = {(r["shape"], r["op"], r["dtype"], r["impl"]): r for r in results}
    lines = ["| shape | op | dtype | vqfast ms | vs reference | vs vector-quantize-pytorch | peak MiB (vqfast / ref) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for (shape, op, dtype, impl), r in by.items():
        if not impl.startswith("vqfast") or r["median_ms"] is None:
            continue
        if impl == "vqfast[torch]" and (by.get((shape, op, dtype, "vqfast[triton]"))
                                        or {}).get("median_ms"):
            continue  # on a GPU the headline is the Triton path
        ref = by.get((shape, op, dtype, "reference"), {})
        peer = by.get((shape, op, dtype, "vector-quantize-pytorch"), {})
        vs_ref = f"{ref['median_ms'] / r['median_ms']:.1f}x" if ref.get("median_ms") else "n/a"
        vs_peer = (f"{peer['median_ms'] / r['median_ms']:.1f}x" if peer.get("median_ms")
                   else f"n/a ({(peer.get('skipped') or 'not run')[:40]})")
        ref_mem = f"{ref['peak_mib']:.0f}" if ref.get("peak_mib") is not None else "n/a"
        lines.append(f"| {shape} | {op} | {dtype} | {r['median_ms']:.3f} ({impl}) | {vs_ref} | "
                     f"{vs_peer} | {r['peak_mib']:.0f} / {ref_mem} |")
    errors = [f"  - {r['shape']} {r['op']} {r['dtype']} {r['impl']}: {r['skipped']}"
              for r in results if (r.get("skipped") or "").startswith("error")]
    residual = json.loads(path.read_text()).get("residual", [])
    if residual:
        lines += ["", "| residual case | implementation | fwd+bwd ms | peak MiB | vs peer |",
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
        lines.append(f"- {name}: {value}")
    share = parts.get("quantizer_share", {})
    if "quantizer_share" in share:
        lines.append(f"- quantizer: {share['quantizer_ms']:.3f} ms of a {share['step_ms']:.3f} ms "
                     f"step ({100 * share['quantizer_share']:.1f}%)")
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


def summary(out: Path, parts: dict) -> str:
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    failed = [name for name, rc in parts.items() if rc != 0]
    head = "all parts passed" if not failed else f"FAILED: {', '.join(failed)}"
    lines = [
        f"# vqfast GPU run: {head}",
        "",
        f"{env.get('gpu') or 'no GPU (dry run on CPU)'} · SMs {env.get('sm_count')} · driver "
        f"{env.get('driver')} · CUDA {env.get('cuda_runtime')} · torch {env.get('torch')} · "
        f"triton {env.get('triton')} · numpy {env.get('numpy')} · Python {env.get('python')} · "
        f"vector-quantize-pytorch {env.get('vector_quantize_pytorch')} · vqfast "
        f"{env.get('vqfast_commit')} · {env.get('date')}",
        "",
        "| part | exit code | file |",
        "|---|---:|---|",
    ]
    files = {"env": "env.json", "tests": "tests.xml, tests.log", "bench": "bench.json, bench.md, bench.png",
             "train": "train.json"}
    for name, rc in parts.items():
        lines.append(f"| {name} | {rc} | {files.get(name, '')} |")
    lines += ["", "## Tests on the device", "", _tests(out), "",
              "## Headline ratios (one run, side by side)", "", _bench(out), "",
              "## Training step", "", _train(out), ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["env", "summary"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--part", action="append", default=[], metavar="NAME=RC",
                        help="a part's name and exit code (summary)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "env":
        (args.out / "env.json").write_text(json.dumps(environment(), indent=1))
        return 0
    parts = dict((item.split("=", 1)[0], int(item.split("=", 1)[1])) for item in args.part)
    (args.out / "SUMMARY.md").write_text(summary(args.out, parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
