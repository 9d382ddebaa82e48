"""``python -m benchmarks.residual_lookup_free``: ResidualFSQ and ResidualLFQ training steps
against vector-quantize-pytorch's.

Forward + backward (to the input) at codec / tokenizer shapes, channel-last tokens on both
sides: vqfast runs every level of every group in one fused launch (on CUDA) and streams
LFQ's codebook entropy (never ``[N, 2**d]``); vector-quantize-pytorch loops over its levels, one
FSQ or LFQ module each, and builds LFQ's ``[N, 2**d]`` probabilities per level. It runs
its defaults (its ResidualFSQ bounds with symmetry-preserving FSQ levels and a soft clamp:
the same elementwise arithmetic per level, a different grid); median time and peak
memory, side by side in one run.
"""

import dataclasses

import torch

import vqfast

from .suite import (environment, measure_into, pick_device, save_side_report, set_speedups,
                    side_parser, side_table, speedup_cell)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "fsq" or "lfq"
    n: int
    bits: int  # LFQ: bits per level; FSQ: channels (levels (8, 5, 5, 5)[:bits])
    levels: int


CASES = [Case("audio codec FSQ", "fsq", 65536, 4, 8),
         Case("tokenizer LFQ", "lfq", 16384, 10, 4)]
QUICK = [dataclasses.replace(c, n=512) for c in CASES]
PEER = "vector-quantize-pytorch"
FSQ_LEVELS = (8, 5, 5, 5)


@dataclasses.dataclass
class Row:
    case: str
    impl: str
    n: int
    bits: int
    levels: int
    median_ms: float | None = None
    peak_mib: float | None = None
    speedup_vs_peer: float | None = None
    skipped: str | None = None


def _modules(case: Case):
    if case.kind == "fsq":
        levels = list(FSQ_LEVELS[:case.bits])
        ours = vqfast.ResidualFSQ(levels, case.levels, channel_last=True)
    else:
        ours = vqfast.ResidualLFQ(case.bits, case.levels, commitment_cost=0.0, channel_last=True)
    try:
        import vector_quantize_pytorch as vqp
    except ImportError:
        return {"vqfast": ours}
    if case.kind == "fsq":
        peer = vqp.ResidualFSQ(levels=levels, num_quantizers=case.levels, dim=case.bits)
    else:
        peer = vqp.ResidualLFQ(dim=case.bits, codebook_size=2**case.bits,
                               num_quantizers=case.levels)
    return {"vqfast": ours, PEER: peer}


def _step(impl, kind, module, z):
    def step():
        out = module(z)
        if kind == "fsq":
            loss, q = 0.0, out[0]
        elif impl == "vqfast":
            loss, q = out[0], out[1]
        else:
            q, loss = out[0], out[2].sum()
        (loss + q.float().mean()).backward()
    return step


def run(cases, device, progress=print):
    rows = []
    for case in cases:
        x = torch.randn(case.n // 256, 256, case.bits, generator=torch.Generator().manual_seed(0))
        x = (0.5 * x).to(device)
        modules = _modules(case)
        case_rows = []
        for impl in ("vqfast", PEER):
            row = Row(case.name, impl, case.n, case.bits, case.levels)
            if impl not in modules:
                row.skipped = f"{PEER} not installed"
                case_rows.append(row)
                continue
            module = modules[impl].to(device).train()
            z = x.clone().requires_grad_()
            measure_into(row, lambda step=_step(impl, case.kind, module, z): step, device)
            progress(f"{case.name:<18} {impl:<24} "
                     + (f"{row.median_ms:10.2f} ms" if row.median_ms else row.skipped))
            case_rows.append(row)
        set_speedups(case_rows, PEER)
        rows += case_rows
    return rows


def markdown(env, rows) -> str:
    return side_table(env, rows, [
        ("case", lambda r: r.case), ("N", lambda r: str(r.n)),
        ("channels / bits", lambda r: str(r.bits)), ("levels", lambda r: str(r.levels)),
        ("implementation", lambda r: r.impl)], [
        ("fwd+bwd ms", lambda r: f"{r.median_ms:.1f}"), ("peak MiB", lambda r: f"{r.peak_mib:.1f}"),
        ("speedup vs vector-quantize-pytorch", lambda r: speedup_cell(r.speedup_vs_peer, ".1f"))])


def main(argv=None):
    args = side_parser("python -m benchmarks.residual_lookup_free", __doc__,
                       "residual_lookup_free", ("--quick", "both cases at N = 512")).parse_args(argv)
    device = pick_device(args.device)
    env = environment(device)
    rows = run(QUICK if args.quick else CASES, device)
    save_side_report(env, rows, markdown(env, rows), args.out, key="residual_lookup_free",
                     heading="Residual FSQ / LFQ", name=args.name, merge_into=args.merge_into)


if __name__ == "__main__":
    main()
