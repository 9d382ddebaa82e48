"""``python -m benchmarks.lookup_free``: LFQ and FSQ, vqfast vs vector-quantize-pytorch.

LFQ's codebook entropy needs the probability of every one of the ``2**d`` codes for every
vector. vqfast streams the codes (exact, ``[2**d]`` memory); vector-quantize-pytorch
materialises ``[N, 2**d]`` probabilities, or a random fraction of the rows of it with
``frac_per_sample_entropy < 1``. Per case: forward + backward time, peak memory, and
vector-quantize-pytorch's error in the codebook entropy against vqfast's exact value (same
inputs). BSQ (``LFQ(spherical=True)``: the vectors on the unit sphere, codes ``±1/sqrt(d)``) runs the
same comparison against vector-quantize-pytorch's ``LFQ(spherical=True)``.
"""

import argparse
import dataclasses
from pathlib import Path

import torch

import vqfast
from vqfast.ops import lfq as lfq_ops
from vqfast.ops.dispatch import resolve_backend

from .measure import median_seconds, peak_extra_bytes
from .suite import device_line, environment, memory_budget, save_side_report


@dataclasses.dataclass
class Row:
    quantizer: str
    impl: str
    d: int
    n: int
    median_ms: float | None = None
    peak_mib: float | None = None
    codebook_entropy: float | None = None
    entropy_error: float | None = None
    skipped: str | None = None


def _peer(kind: str, d: int, frac: float = 1.0):
    try:
        import vector_quantize_pytorch as vqp
    except ImportError:
        return None
    if kind in ("lfq", "bsq"):
        return vqp.LFQ(dim=d, codebook_size=2**d, entropy_loss_weight=0.1,
                       commitment_loss_weight=0.25, frac_per_sample_entropy=frac, channel_first=True,
                       spherical=kind == "bsq")
    return vqp.FSQ(levels=[8, 5, 5, 5], channel_first=True)


def lfq_cases(dims, n, device, progress=print, kind="lfq"):
    """LFQ (``kind="lfq"``) or BSQ (``"bsq"``) at each of ``dims``."""
    rows = []
    spherical = kind == "bsq"
    for d in dims:
        generator = torch.Generator().manual_seed(d)
        z = (0.1 * torch.randn(n // 64, d, 8, 8, generator=generator)).to(device)
        flat = z.movedim(1, -1).reshape(-1, d)
        if spherical:  # the entropy of u = z / |z| against codes ±1/sqrt(d)
            flat = torch.nn.functional.normalize(flat, dim=1) / d**0.5
        exact = float(lfq_ops.codebook_entropy(flat, 100.0,
                                               resolve_backend("auto", flat.device)))
        ours = vqfast.LFQ(d, spherical=spherical).to(device)
        impls = [("vqfast (exact)", ours, 1.0)]
        for frac in (1.0, 0.25):
            impls.append((f"vector-quantize-pytorch (frac_per_sample_entropy={frac})",
                          _peer(kind, d, frac), frac))
        for name, module, frac in impls:
            row = Row(kind, name, d, n)
            if module is None:
                row.skipped = "vector-quantize-pytorch not installed"
            elif name.startswith("vector") and 4 * n * frac * 2**d * 4 > memory_budget(device):
                row.skipped = (f"needs ~{4 * n * frac * 2**d * 4 / 2**30:.0f} GiB for its "
                               f"[{int(n * frac)}, 2**{d}] probabilities")
            else:
                module = module.to(device)
                x = z.clone().requires_grad_()

                def step(module=module, x=x, name=name):
                    out = module(x, return_loss_breakdown=True) if name.startswith("vector") else module(x)
                    loss = out[0][2] if name.startswith("vector") else out[0]
                    loss.backward()
                    return out
                try:
                    row.median_ms = median_seconds(step, device) * 1e3
                    row.peak_mib = peak_extra_bytes(step, device) / 2**20
                    if name.startswith("vector"):
                        breakdown = step()[1]
                        row.codebook_entropy = float(breakdown.batch_entropy.detach())
                    else:
                        row.codebook_entropy = exact
                    row.entropy_error = (abs(row.codebook_entropy - exact) / exact
                                         if exact else None)
                except Exception as error:  # record it, go on
                    row.skipped = f"error: {type(error).__name__}: {str(error)[:100]}"
            progress(f"{kind} d={d:>2} {name:<58} "
                     + (f"{row.median_ms:10.2f} ms" if row.median_ms else row.skipped))
            rows.append(row)
    return rows


def fsq_cases(n, device, progress=print):
    rows = []
    levels = [8, 5, 5, 5]
    z = torch.randn(n // 64, len(levels), 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    for name, module in (("vqfast", vqfast.FSQ(levels)), ("vector-quantize-pytorch", _peer("fsq", 4))):
        row = Row("fsq", name, len(levels), n)
        if module is None:
            row.skipped = "vector-quantize-pytorch not installed"
        else:
            module = module.to(device)
            x = z.clone().requires_grad_()

            def step(module=module, x=x):
                module(x)[0].sum().backward()
            row.median_ms = median_seconds(step, device) * 1e3
            row.peak_mib = peak_extra_bytes(step, device) / 2**20
        progress(f"fsq {levels} {name:<30} "
                 + (f"{row.median_ms:10.3f} ms" if row.median_ms else row.skipped))
        rows.append(row)
    return rows


def markdown(env, rows) -> str:
    lines = [device_line(env), "",
             "| quantizer | d | N | implementation | fwd+bwd ms | peak MiB | codebook entropy | rel. error vs exact |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.quantizer} | {r.d} | {r.n} | {r.impl} | skipped: {r.skipped} | | | |")
            continue
        entropy = f"{r.codebook_entropy:.4f}" if r.codebook_entropy is not None else ""
        error = f"{r.entropy_error:.2e}" if r.entropy_error is not None else ""
        lines.append(f"| {r.quantizer} | {r.d} | {r.n} | {r.impl} | {r.median_ms:.2f} | "
                     f"{r.peak_mib:.1f} | {entropy} | {error} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    """The command line's options (its defaults: the cases the GPU command runs)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lookup_free", description=__doc__)
    parser.add_argument("--dims", type=int, nargs="+", default=[10, 14, 16, 18])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--bsq-dims", type=int, nargs="+", default=[10, 16])
    parser.add_argument("--quantizers", nargs="+", choices=["lfq", "bsq", "fsq"],
                        default=["lfq", "bsq", "fsq"])
    parser.add_argument("--quick", action="store_true", help="d = 8, 10 at N = 1024")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    parser.add_argument("--name", default=None)
    parser.add_argument("--merge-into", default=None, metavar="STEM",
                        help="add the results to OUT/STEM.json (key lookup_free) and STEM.md "
                             "instead of writing files of their own (the GPU command's bench.*)")
    args = parser.parse_args(argv)
    if args.quick:
        args.dims, args.bsq_dims, args.n = [8, 10], [8], 1024
    return args


def main(argv=None):
    args = parse_args(argv)
    device = (torch.device("cuda" if torch.cuda.is_available() else "cpu")
              if args.device == "auto" else torch.device(args.device))
    env = environment(device)
    rows = []
    if "lfq" in args.quantizers:
        rows += lfq_cases(args.dims, args.n, device)
    if "bsq" in args.quantizers:
        rows += lfq_cases(args.bsq_dims, args.n, device, kind="bsq")
    if "fsq" in args.quantizers:
        rows += fsq_cases(args.n, device)
    save_side_report(env, rows, markdown(env, rows), args.out, key="lookup_free",
                     heading="Lookup-free quantizers", name=args.name, merge_into=args.merge_into)


if __name__ == "__main__":
    main()
