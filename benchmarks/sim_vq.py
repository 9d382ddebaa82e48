"""``python -m benchmarks.sim_vq``: SimVQ's training step against vector-quantize-pytorch.

Forward + backward (to the input and the learned map) of ``SimVQ`` at tokenizer shapes,
vqfast (the projected codebook once per step, then the fused single-codebook op: no
``[N, K]`` tensor) against vector-quantize-pytorch's ``SimVQ`` (``torch.cdist`` over
``[N, K]``), same basis and map, rotation trick off on both; median time and peak memory,
side by side in one run.
"""

import dataclasses

import torch

import vqfast

from .suite import (environment, measure_into, pick_device, save_side_report, set_speedups,
                    side_parser, side_table, speedup_cell)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    n: int
    d: int
    k: int


CASES = [Case("image tokenizer", 16384, 256, 8192), Case("large codebook", 8192, 64, 65536)]
QUICK = [dataclasses.replace(c, n=256, k=min(c.k, 64)) for c in CASES]
PEER = "vector-quantize-pytorch"


@dataclasses.dataclass
class Row:
    case: str
    impl: str
    n: int
    d: int
    k: int
    median_ms: float | None = None
    peak_mib: float | None = None
    speedup_vs_peer: float | None = None
    skipped: str | None = None


def _modules(case: Case):
    ours = vqfast.SimVQ(case.k, case.d, 0.25)
    try:
        import vector_quantize_pytorch as vqp
    except ImportError:
        return {"vqfast": ours}
    peer = vqp.SimVQ(dim=case.d, codebook_size=case.k, rotation_trick=False,
                     input_to_quantize_commit_loss_weight=0.25)
    with torch.no_grad():
        ours.basis.copy_(peer.frozen_codebook)
        ours.code_transform.weight.copy_(peer.code_transform.weight)
    return {"vqfast": ours, PEER: peer}


def run(cases, device, progress=print):
    rows = []
    for case in cases:
        x = torch.randn(case.n // 256, 256, case.d, generator=torch.Generator().manual_seed(0))
        x = x.to(device)
        modules = _modules(case)
        case_rows = []
        for impl in ("vqfast", PEER):
            row = Row(case.name, impl, case.n, case.d, case.k)
            if impl not in modules:
                row.skipped = f"{PEER} not installed"
                case_rows.append(row)
                continue
            module = modules[impl].to(device).train()
            z = x.clone().requires_grad_()
            if impl == "vqfast":
                module.channel_last = True

                def step(module=module, z=z):
                    loss, q, _, _ = module(z)
                    (loss + q.float().mean()).backward()
            else:
                def step(module=module, z=z):
                    q, _, loss = module(z)
                    (loss + q.float().mean()).backward()
            measure_into(row, lambda step=step: step, device)
            progress(f"{case.name:<16} {impl:<24} "
                     + (f"{row.median_ms:10.2f} ms" if row.median_ms else row.skipped))
            case_rows.append(row)
        set_speedups(case_rows, PEER)
        rows += case_rows
    return rows


def markdown(env, rows) -> str:
    return side_table(env, rows, [
        ("case", lambda r: r.case), ("N", lambda r: str(r.n)), ("D", lambda r: str(r.d)),
        ("K", lambda r: str(r.k)), ("implementation", lambda r: r.impl)], [
        ("fwd+bwd ms", lambda r: f"{r.median_ms:.1f}"), ("peak MiB", lambda r: f"{r.peak_mib:.1f}"),
        ("speedup vs vector-quantize-pytorch", lambda r: speedup_cell(r.speedup_vs_peer, ".1f"))])


def main(argv=None):
    args = side_parser("python -m benchmarks.sim_vq", __doc__, "sim_vq",
                       ("--quick", "both cases at N = 256, K <= 64")).parse_args(argv)
    device = pick_device(args.device)
    env = environment(device)
    rows = run(QUICK if args.quick else CASES, device)
    save_side_report(env, rows, markdown(env, rows), args.out, key="sim_vq",
                     heading="SimVQ", name=args.name, merge_into=args.merge_into)


if __name__ == "__main__":
    main()
