"""``python -m benchmarks.multiscale``: VAR's multi-scale residual quantizer, vqfast against
the plain implementation.

Forward + backward (to the features, the codebook and the ``Phi`` convs) of
``MultiScaleResidualVQ`` at VAR's shapes (K = 4096, D = 32, its ``patch_nums``), vqfast
(each scale's nearest-code search on the fused path: no ``[N, K]`` tensor) against VAR's
algorithm as written (``vqfast.reference.multiscale_residual_vq``: an ``[N, K]`` distance
matrix per scale), the same codebook and convs; median time and peak memory, side by side
in one run. Both share the resampling and the convs, which are most of the work on a CPU.
"""

import dataclasses

import torch

import vqfast
from vqfast import reference

from .suite import (environment, measure_into, pick_device, save_side_report, set_speedups,
                    side_parser, side_table, speedup_cell)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    size: int
    scales: tuple
    k: int = 4096
    d: int = 32


CASES = [Case("VAR 256px", 32, 16, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
         Case("VAR 512px", 8, 32, (1, 2, 3, 4, 6, 9, 13, 18, 24, 32))]
QUICK = [dataclasses.replace(c, batch=2, k=64) for c in CASES]
PLAIN = "plain [N, K] (VAR's)"


@dataclasses.dataclass
class Row:
    case: str
    impl: str
    batch: int
    size: int
    k: int
    median_ms: float | None = None
    peak_mib: float | None = None
    speedup_vs_plain: float | None = None
    skipped: str | None = None


def _steps(case: Case, device):
    vq = vqfast.MultiScaleResidualVQ(case.k, case.d, case.scales, ema=False,
                                     kmeans_init=False).to(device)
    with torch.no_grad():
        vq.codebook.normal_()
    f = torch.randn(case.batch, case.d, case.size, case.size, device=device,
                    generator=None).requires_grad_()
    phis = [vq.quant_resi[i] for i in vq._phi_of_scale]

    def ours():
        loss, q, _, _ = vq(f)
        (loss + q.mean()).backward()

    def plain():
        loss, q, _, _ = reference.multiscale_residual_vq(f, vq.codebook, vq.scales, phis)
        (loss + q.mean()).backward()
    return {"vqfast": ours, PLAIN: plain}


def run(cases, device, progress=print):
    rows = []
    for case in cases:
        torch.manual_seed(0)
        steps = _steps(case, device)
        case_rows = []
        for impl, step in steps.items():
            row = Row(case.name, impl, case.batch, case.size, case.k)
            measure_into(row, lambda step=step: step, device)
            progress(f"{case.name:<12} {impl:<22} "
                     + (f"{row.median_ms:10.2f} ms" if row.median_ms else str(row.skipped)))
            case_rows.append(row)
        set_speedups(case_rows, PLAIN, "speedup_vs_plain")
        rows += case_rows
    return rows


def markdown(env, rows) -> str:
    return side_table(env, rows, [
        ("case", lambda r: r.case), ("batch", lambda r: str(r.batch)),
        ("latent", lambda r: f"{r.size}x{r.size}"), ("K", lambda r: str(r.k)),
        ("implementation", lambda r: r.impl)], [
        ("fwd+bwd ms", lambda r: f"{r.median_ms:.1f}"), ("peak MiB", lambda r: f"{r.peak_mib:.1f}"),
        ("speedup vs plain", lambda r: speedup_cell(r.speedup_vs_plain, ".2f"))])


def main(argv=None):
    args = side_parser("python -m benchmarks.multiscale", __doc__, "multiscale",
                       ("--quick", "both cases at batch 2, K = 64")).parse_args(argv)
    device = pick_device(args.device)
    env = environment(device)
    rows = run(QUICK if args.quick else CASES, device)
    save_side_report(env, rows, markdown(env, rows), args.out, key="multiscale",
                     heading="Multi-scale residual VQ (VAR)", name=args.name,
                     merge_into=args.merge_into)


if __name__ == "__main__":
    main()
