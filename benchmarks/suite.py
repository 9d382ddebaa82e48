"""Benchmark cases: shapes x ops x implementations, measured side by side in one run."""

import argparse
import dataclasses
import datetime
import json
import platform
from pathlib import Path

import torch

import vqfast
from vqfast import reference
from vqfast.ops import dispatch

from .measure import CPU_TIMING_THREADS, median_seconds, peak_extra_bytes


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    n: int
    d: int
    k: int

    @property
    def image(self):
        """``[B, D, H, W]`` with ``B * H * W = N`` (H = W = 8, as in the original notebook)."""
        return (self.n // 64, self.d, 8, 8)


SEED = Shape("vqvae", 16384, 64, 512)  # the VQ-VAE on CIFAR-10: batch 256 of 8x8 latents
TINY = Shape("tiny", 512, 16, 64)  # --tiny: the pipeline in seconds (the GPU script's dry run)
LARGE = Shape("large", 65536, 256, 16384)
K_SWEEP = [Shape(f"K={k}", 16384, 64, k) for k in (256, 1024, 4096, 16384, 65536)]
N_SWEEP = [Shape(f"N={n}", n, 64, 512) for n in (1024, 4096, 65536, 262144)]
QUICK_K_SWEEP = K_SWEEP[:3]

OPS = ("nearest", "forward", "fwd_bwd", "ema_step")
IMPLS = ("reference", "vqfast[torch]", "vqfast[triton]", "vector-quantize-pytorch")

# Dense peaks (TFLOP/s for bf16 / tf32 tensor cores, fp32 CUDA cores) and HBM bandwidth
# (TB/s) of devices we know, matched by a substring of the device name.
DEVICE_PEAKS = {
    "H100 SXM": dict(bf16=989.0, tf32=494.5, fp32=66.9, tbps=3.35),
    "H100 80GB HBM3": dict(bf16=989.0, tf32=494.5, fp32=66.9, tbps=3.35),
    "H100 PCIe": dict(bf16=756.0, tf32=378.0, fp32=51.2, tbps=2.0),
    "H200": dict(bf16=989.0, tf32=494.5, fp32=66.9, tbps=4.8),
    "A100": dict(bf16=312.0, tf32=156.0, fp32=19.5, tbps=2.0),
}


class Skip(Exception):
    """A case that cannot run here; the message says why."""


def memory_budget(device: torch.device) -> float:
    """Bytes another implementation's ``[N, K]`` matrices may take before its case is
    skipped: 8 GiB on a CPU (more takes minutes per call), 80% of the free memory on a GPU."""
    return 8 << 30 if device.type == "cpu" else 0.8 * torch.cuda.mem_get_info(device)[0]


def _reference_bytes(shape: Shape) -> int:
    # distances, two expanded temporaries and the one-hot, all fp32 [N, K]
    return 4 * shape.n * shape.k * 4


def _vqp(shape: Shape, ema: bool):
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError as exc:
        raise Skip("vector-quantize-pytorch not installed") from exc
    # Configured like the seed: EMA (or a learned codebook), commitment 0.25, no k-means
    # init, plain straight-through (no rotation trick).
    return VectorQuantize(dim=shape.d, codebook_size=shape.k, decay=0.99, eps=1e-5,
                          commitment_weight=0.25, kmeans_init=False, accept_image_fmap=True,
                          rotation_trick=False, ema_update=ema, learnable_codebook=not ema)


def _module(impl: str, shape: Shape, ema: bool):
    if impl == "reference":
        if ema:
            return reference.VectorQuantizerEMA(shape.k, shape.d, 0.25, 0.99)
        return reference.VectorQuantizer(shape.k, shape.d, 0.25)
    if impl == "vector-quantize-pytorch":
        return _vqp(shape, ema)
    backend = impl[len("vqfast["):-1]
    cls = vqfast.VectorQuantizerEMA if ema else vqfast.VectorQuantizer
    # the algorithm the reference and the peer run here (no k-means, no re-seeding)
    return cls(shape.k, shape.d, 0.25, backend=backend, **vqfast.ORIGINAL_ALGORITHM)


def _first(out):
    """The quantized output and the loss, whichever library's tuple ``out`` is."""
    if len(out) == 4:  # vqfast / reference: (loss, quantized, perplexity, encodings)
        return out[1], out[0]
    return out[0], out[2]  # vector-quantize-pytorch: (quantized, indices, loss)


def make_case(impl: str, op: str, shape: Shape, device: torch.device, dtype: torch.dtype):
    """A zero-argument callable running ``op`` once, or ``Skip``."""
    if impl == "vqfast[triton]" and device.type != "cuda" and not dispatch._triton_interpreted():
        raise Skip("Triton backend needs a CUDA device")
    if impl in ("reference", "vector-quantize-pytorch"):
        # Both materialise [N, K] distances and one-hots: skip what cannot fit (or, on a
        # CPU, would take minutes per call) and say what it would need.
        if _reference_bytes(shape) > memory_budget(device):
            raise Skip(f"needs ~{_reference_bytes(shape) / 2**30:.0f} GiB for its [N, K] matrices")

    generator = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(shape.image, generator=generator).to(device=device, dtype=dtype)

    if op == "nearest":
        if impl == "vector-quantize-pytorch":
            raise Skip("no standalone nearest-code op")
        codebook = torch.randn(shape.k, shape.d, generator=generator).to(device)
        x = z.movedim(1, -1).reshape(-1, shape.d).contiguous()
        if impl == "reference":
            return lambda: reference.nearest_code(x.float(), codebook)
        backend = impl[len("vqfast["):-1]
        return lambda: vqfast.nearest_code(x, codebook, backend=backend)

    ema = op in ("forward", "ema_step")
    module = _module(impl, shape, ema).to(device)
    if op == "forward":
        module.eval()

        def run():
            with torch.no_grad():
                return module(z)
        return run

    module.train()
    z_grad = z.detach().requires_grad_()

    def step():
        quantized, loss = _first(module(z_grad))
        (loss + quantized.float().mean()).backward()
    return step


@dataclasses.dataclass
class Result:
    impl: str
    op: str
    shape: str
    n: int
    d: int
    k: int
    dtype: str
    median_ms: float | None = None
    peak_mib: float | None = None
    speedup: float | None = None
    memory_ratio: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    skipped: str | None = None


def _throughput(result: Result, seconds: float, dtype: torch.dtype, device: torch.device):
    """Distance-GEMM TFLOP/s and GB/s moved for the nearest-code op (the fused kernel's floor)."""
    result.tflops = 2 * result.n * result.k * result.d / seconds / 1e12
    elem = torch.finfo(dtype).bits // 8
    moved = result.n * result.d * elem + result.k * result.d * 4 + result.n * (8 + 4)
    result.gbps = moved / seconds / 1e9


def run(shapes, ops, impls, device: torch.device, dtypes, progress=print):
    results = []
    for dtype in dtypes:
        for shape in shapes:
            for op in ops:
                row = {}
                for impl in impls:
                    result = Result(impl, op, shape.name, shape.n, shape.d, shape.k,
                                    str(dtype).replace("torch.", ""))
                    try:
                        fn = make_case(impl, op, shape, device, dtype)
                        result.median_ms = median_seconds(fn, device) * 1e3
                        result.peak_mib = peak_extra_bytes(fn, device) / 2**20
                        if op == "nearest" and impl.startswith("vqfast") and device.type == "cuda":
                            _throughput(result, result.median_ms / 1e3, dtype, device)
                    except Skip as reason:
                        result.skipped = str(reason)
                    except Exception as error:  # one failing case must not end the run: report it
                        result.skipped = f"error: {type(error).__name__}: {str(error)[:120]}"
                    row[impl] = result
                    progress(f"{shape.name:>8} {op:>8} {result.dtype:>8} {impl:<24} "
                             + (f"{result.median_ms:9.3f} ms" if result.median_ms else result.skipped))
                base = row.get("reference")
                for result in row.values():
                    if base and base.median_ms and result.median_ms:
                        result.speedup = base.median_ms / result.median_ms
                        if result.peak_mib is not None and base.peak_mib:
                            result.memory_ratio = result.peak_mib / base.peak_mib
                    results.append(result)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return results


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine())
    return {
        "device": name,
        "device_type": device.type,
        "cpu_threads": CPU_TIMING_THREADS,  # the threads CPU times are taken on
        "torch": torch.__version__,
        "triton": triton_version,
        "vqfast": vqfast.__version__,
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
    }


def peaks_for(env: dict):
    for key, peaks in DEVICE_PEAKS.items():
        if key in env["device"]:
            return peaks
    return None


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def device_line(env: dict) -> str:
    """The line every report starts with: machine, threads, versions, date."""
    threads = f"{env['cpu_threads']} thread{'s' if env['cpu_threads'] != 1 else ''}"
    return (f"**Device** {env['device']} ({env['device_type']}, {threads}) · "
            f"torch {env['torch']} · triton {env['triton']} · vqfast {env['vqfast']} · {env['date']}")


def _times(value: float) -> str:
    return f"{value:.1f}x" if value < 20 else f"{value:.0f}x"


def time_vs_reference(speedup) -> str:
    """``"3.5x faster"`` / ``"1.4x slower"`` / ``"1x"`` (``speedup``: the reference's time
    over this row's), as the README's tables say it."""
    if not speedup:
        return ""
    if round(speedup, 2) == 1:
        return "1x"
    return f"{_times(speedup)} faster" if speedup > 1 else f"{_times(1 / speedup)} slower"


def memory_vs_reference(ratio) -> str:
    """``"11.6x less"`` / ``"2.0x more"`` / ``"1x"`` (``ratio``: this row's peak memory over
    the reference's)."""
    if not ratio:
        return ""
    if round(ratio, 2) == 1:
        return "1x"
    return f"{_times(1 / ratio)} less" if ratio < 1 else f"{_times(ratio)} more"


def markdown(env: dict, results, note: str | None = None) -> str:
    """The table of the rows that ran; the cases that could not run on this device are
    listed once below it, by reason."""
    peaks = peaks_for(env)
    lines = [device_line(env), ""] + ([f"**{note}**", ""] if note else []) + [
        "| shape | op | dtype | implementation | median ms | peak MiB | vs the original: time | vs the original: memory | TFLOP/s | GB/s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    not_run = {}
    for r in results:
        if r.skipped:
            not_run.setdefault(r.skipped, []).append(f"{r.shape} {r.op} {r.dtype} {r.impl}")
            continue
        tflops = _fmt(r.tflops, ".1f")
        if peaks and r.tflops:
            peak = peaks["bf16"] if r.dtype != "float32" else peaks["fp32"]
            tflops += f" ({100 * r.tflops / peak:.0f}%)"
        gbps = _fmt(r.gbps, ".0f")
        if peaks and r.gbps:
            gbps += f" ({100 * r.gbps / (1e3 * peaks['tbps']):.0f}%)"
        lines.append(
            f"| {r.shape} | {r.op} | {r.dtype} | {r.impl} | {r.median_ms:.3f} | {r.peak_mib:.1f} | "
            f"{time_vs_reference(r.speedup)} | {memory_vs_reference(r.memory_ratio)} | "
            f"{tflops} | {gbps} |")
    if not_run:
        lines += ["", "Not run on this device:"]
        for reason, cases in not_run.items():
            impls = sorted({c.rsplit(" ", 1)[1] for c in cases})
            every = all(sum(c.endswith(" " + i) for c in cases) ==
                        sum(r.impl == i for r in results) for i in impls)
            what = (f"{', '.join(impls)} (every case)" if every
                    else "; ".join(cases[:8]) + (f" and {len(cases) - 8} more" if len(cases) > 8 else ""))
            lines.append(f"- {what}: {reason}")
    return "\n".join(lines) + "\n"


def save(env: dict, results, out_dir: Path, tag: str, name: str | None = None,
         note: str | None = None) -> dict:
    """Write JSON, markdown and a PNG (time and peak memory, the speedup and memory ratio
    against the reference written on vqfast's points) as ``out_dir/name.*`` (default name:
    date, device and ``tag``); return the paths. ``note`` heads the table and the plot."""
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = env["device"].replace(" ", "-").replace("/", "-") or env["device_type"]
    stem = out_dir / (name or f"{env['date']}-{env['device_type']}-{slug}-{tag}")
    paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md")}
    paths["json"].write_text(json.dumps(
        {"environment": env, "note": note, "results": [dataclasses.asdict(r) for r in results]},
        indent=1))
    paths["md"].write_text(markdown(env, results, note))
    swept = [r for r in results if r.shape.startswith("K=") and r.median_ms]
    try:  # the figure is optional: a machine without matplotlib still gets every number
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"matplotlib is not installed: no figure ({stem.name}.png); "
              "the JSON and markdown have every number")
        return paths
    paths["png"] = stem.with_suffix(".png")
    if swept:
        plot_k_sweep(env, swept, paths["png"], note)
    else:
        plot_bars(env, [r for r in results if r.median_ms], paths["png"], note)
    return paths


def _ratio_label(r) -> str:
    """``"12.3x faster, 48x less memory"`` against the reference (the words a reader wants)."""
    parts = []
    if r.speedup:
        parts.append(f"{r.speedup:.1f}x faster" if r.speedup >= 1 else f"{1 / r.speedup:.1f}x slower")
    if r.memory_ratio:
        inverse = 1 / r.memory_ratio
        parts.append(f"{inverse:.0f}x less memory" if inverse >= 1.5 else f"{r.memory_ratio:.2f}x the memory")
    return "\n".join(parts)


def _title(env: dict, note: str | None) -> str:
    return (f"{env['device']} · torch {env['torch']} · {env['date']}"
            + (f"\n{note}" if note else "") + "\nratios: vqfast vs the reference, same run")


def plot_bars(env: dict, results, path: Path, note: str | None = None) -> None:
    """Median time and peak memory per (shape, op, dtype), one bar per implementation, each
    vqfast bar labelled with its speedup and memory ratio against the reference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = list(dict.fromkeys((r.shape, r.op, r.dtype) for r in results))
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.6 * len(cases)), 7.5), sharex=True)
    width = 0.8 / len(IMPLS)
    colors = dict(zip(IMPLS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, field, label in ((axes[0], "median_ms", "median ms"), (axes[1], "peak_mib", "peak MiB")):
        for i, impl in enumerate(IMPLS):
            rows = {(r.shape, r.op, r.dtype): r for r in results if r.impl == impl}
            if not rows:
                continue
            xs = [j + i * width for j, case in enumerate(cases) if case in rows]
            values = [max(getattr(rows[c], field) or 0, 1e-3) for c in cases if c in rows]
            ax.bar(xs, values, width, label=impl, color=colors[impl])
            if impl.startswith("vqfast") and ax is axes[0]:
                for x, c in zip(xs, [c for c in cases if c in rows]):
                    ax.annotate(_ratio_label(rows[c]), (x, values[xs.index(x)]), fontsize=6,
                                ha="center", va="bottom", xytext=(0, 2), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_ylabel(label)
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    axes[1].set_xticklabels(["\n".join(c) for c in cases], fontsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle(_title(env, note), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_k_sweep(env: dict, results, path: Path, note: str | None = None) -> None:
    """Time (top) and peak memory (bottom) against K per op; vqfast's points at the largest
    K carry their speedup and memory ratio against the reference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ops = sorted({r.op for r in results}, key=OPS.index)
    fig, axes = plt.subplots(2, len(ops), figsize=(4.8 * len(ops), 7.5), squeeze=False)
    colors = dict(zip(IMPLS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for column, op in enumerate(ops):
        for row, (field, label) in enumerate((("median_ms", "median ms"), ("peak_mib", "peak MiB"))):
            ax = axes[row][column]
            for impl in IMPLS:
                for dtype in sorted({r.dtype for r in results}):
                    rows = sorted((r for r in results if r.op == op and r.impl == impl
                                   and r.dtype == dtype), key=lambda r: r.k)
                    if not rows:
                        continue
                    ax.plot([r.k for r in rows], [max(getattr(r, field) or 0, 1e-3) for r in rows],
                            marker="o" if dtype == "float32" else "s", color=colors[impl],
                            label=f"{impl} {dtype}")
                    if impl.startswith("vqfast") and row == 0:
                        last = max((r for r in rows if r.speedup), key=lambda r: r.k, default=rows[-1])
                        ax.annotate(_ratio_label(last), (last.k, last.median_ms), fontsize=7,
                                    ha="right", va="bottom", xytext=(-4, 4), textcoords="offset points")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("K (codes), N=16384, D=64")
            ax.set_ylabel(label)
            ax.set_title(op)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(_title(env, note), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_side_report(env: dict, rows, table: str, out: Path, *, key: str, heading: str,
                     name: str | None = None, merge_into: str | None = None) -> None:
    """Write a side benchmark's rows (dataclasses) and markdown ``table``: into
    ``out/merge_into.json`` (under ``key``) and ``.md`` (under ``heading``) when merging
    (the GPU command's ``bench.*``), else as ``out/name.json`` and ``.md`` of their own."""
    out.mkdir(parents=True, exist_ok=True)
    records = [dataclasses.asdict(r) for r in rows]
    if merge_into:
        stem = out / merge_into
        report = json.loads(stem.with_suffix(".json").read_text())
        report[key] = records
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
        with open(stem.with_suffix(".md"), "a") as f:
            f.write(f"\n## {heading}\n\n" + table)
    else:
        stem = out / (name or f"{env['date']}-{env['device_type']}-{key.replace('_', '-')}")
        stem.with_suffix(".json").write_text(json.dumps({"environment": env, "results": records},
                                                        indent=1))
        stem.with_suffix(".md").write_text(table)
    print(table)



# --- the side benchmarks' shared command line and measurement -----------------------------

def side_parser(prog: str, description: str, key: str,
                size_flag=("--quick", "small shapes: the pipeline only")) -> argparse.ArgumentParser:
    """The command line every side benchmark takes: a size flag, ``--device``, ``--out``,
    ``--name`` and ``--merge-into`` (the GPU command's ``bench.*``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(size_flag[0], action="store_true", help=size_flag[1])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    parser.add_argument("--name", default=None)
    parser.add_argument("--merge-into", default=None, metavar="STEM",
                        help=f"add the results to OUT/STEM.json (key {key}) and STEM.md")
    return parser


def model_benchmark_main(module: str, doc: str, key: str, heading: str, run, markdown,
                         argv=None) -> None:
    """The command of a benchmark of others' models (``benchmarks.patched``,
    ``benchmarks.codecs``): ``--quick`` (tiny sizes), ``--device``, ``--out``, ``--name``,
    ``--merge-into``; ``run(quick, device)`` gives the rows, ``markdown(env, rows)`` the table."""
    args = side_parser(f"python -m {module}", doc, key,
                       ("--quick", "tiny sizes (a smoke test)")).parse_args(argv)
    device = pick_device(args.device)
    rows = run(args.quick, device)
    env = environment(device)
    save_side_report(env, rows, markdown(env, rows), args.out, key=key, heading=heading,
                     name=args.name, merge_into=args.merge_into)


def pick_device(name: str) -> torch.device:
    """``"auto"``: CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def measure_into(row, make_step, device: torch.device) -> None:
    """``row.median_ms`` and ``row.peak_mib`` of the step ``make_step()`` returns; what
    stops it goes to ``row.skipped`` (a missing peer, out of memory, an error: one failing
    case must not end the run)."""
    try:
        step = make_step()
        row.median_ms = median_seconds(step, device) * 1e3
        row.peak_mib = peak_extra_bytes(step, device) / 2**20
    except LookupError as reason:
        row.skipped = str(reason)
    except torch.OutOfMemoryError:
        row.skipped = "out of memory"
    except Exception as error:
        row.skipped = f"error: {type(error).__name__}: {str(error)[:120]}"


def side_table(env: dict, rows, ident, measured) -> str:
    """A side benchmark's markdown table: ``ident`` and ``measured`` are ``[(header,
    row -> str)]``; a skipped row shows its reason in place of the measured cells."""
    lines = [device_line(env), "",
             "| " + " | ".join(h for h, _ in ident + measured) + " |",
             "|" + "---|" * len(ident) + "---:|" * len(measured)]
    for r in rows:
        head = "| " + " | ".join(f(r) for _, f in ident) + " |"
        if r.skipped:
            lines.append(f"{head} skipped: {r.skipped} |" + " |" * (len(measured) - 1))
        else:
            lines.append(f"{head} " + " | ".join(f(r) for _, f in measured) + " |")
    return "\n".join(lines) + "\n"


def pair_table(env: dict, rows, ident, other: str, note: str) -> str:
    """The table of a benchmark timing an original module against vqfast's side by side
    (``benchmarks.patched``, ``benchmarks.codecs``): ``note``, then ``side_table`` of rows
    with ``original_ms``, ``<other>_ms``, their ``_peak_mib``, ``speedup`` and
    ``codes_equal`` (None: not compared)."""
    def ms(field):
        return lambda r: f"{getattr(r, field):.2f}"
    measured = [("original (ms)", ms("original_ms")), (f"{other} (ms)", ms(f"{other}_ms")),
                ("speedup", lambda r: speedup_cell(r.speedup)),
                (f"peak MiB original / {other}", lambda r: f"{r.original_peak_mib:.1f} / "
                                                           f"{getattr(r, other + '_peak_mib'):.1f}"),
                ("codes equal", lambda r: "" if r.codes_equal is None
                 else "yes" if r.codes_equal else "no")]
    return note + "\n\n" + side_table(env, rows, ident, measured)


def speedup_cell(value, spec=".2f") -> str:
    return f"{value:{spec}}x" if value else ""


def set_speedups(case_rows, baseline: str, field: str = "speedup_vs_peer") -> None:
    """``row.<field> = baseline's time / row's time`` for every timed row of one case, the
    baseline being the timed row whose ``impl`` is ``baseline`` (none: left empty)."""
    base = next((r for r in case_rows if r.impl == baseline and r.median_ms), None)
    for row in case_rows:
        if base and row.median_ms:
            setattr(row, field, base.median_ms / row.median_ms)
