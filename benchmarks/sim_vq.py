"""``python -m benchmarks.sim_vq``: SimVQ's training step against vector-quantize-pytorch.

Forward + backward (to the input and the learned map) of ``SimVQ`` at tokenizer shapes,
vqfast (the projected codebook once per step, then the fused single-codebook op: no
``[N, K]`` tensor) against vector-quantize-pytorch's ``SimVQ`` (``torch.cdist`` over
``[N, K]``), same basis and map, rotation trick off on both; median time and peak memory,
side by side in one run.
"""

import argparse
import dataclasses
from pathlib import Path

import torch

import vqfast

from .measure import median_seconds, peak_extra_bytes
from .suite import device_line, environment, save_side_report


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
            try:
                row.median_ms = median_seconds(step, device) * 1e3
                row.peak_mib = peak_extra_bytes(step, device) / 2**20
            except Exception as error:  # one failing case must not end the run
                row.skipped = f"error: {type(error).__name__}: {str(error)[:120]}"
            progress(f"{case.name:<16} {impl:<24} "
                     + (f"{row.median_ms:10.2f} ms" if row.median_ms else row.skipped))
            case_rows.append(row)
        peer = next((r for r in case_rows if r.impl == PEER and r.median_ms), None)
        for row in case_rows:
            if peer and row.median_ms:
                row.speedup_vs_peer = peer.median_ms / row.median_ms
        rows += case_rows
    return rows


def markdown(env, rows) -> str:
    lines = [device_line(env), "",
             "| case | N | D | K | implementation | fwd+bwd ms | peak MiB | speedup vs peer |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        head = f"| {r.case} | {r.n} | {r.d} | {r.k} | {r.impl} |"
        if r.skipped:
            lines.append(f"{head} skipped: {r.skipped} | | |")
            continue
        speedup = f"{r.speedup_vs_peer:.1f}x" if r.speedup_vs_peer else ""
        lines.append(f"{head} {r.median_ms:.1f} | {r.peak_mib:.1f} | {speedup} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim_vq", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="both cases at N = 256, K <= 64")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    parser.add_argument("--name", default=None)
    parser.add_argument("--merge-into", default=None, metavar="STEM",
                        help="add the results to OUT/STEM.json (key sim_vq) and STEM.md")
    args = parser.parse_args(argv)
    device = (torch.device("cuda" if torch.cuda.is_available() else "cpu")
              if args.device == "auto" else torch.device(args.device))
    env = environment(device)
    rows = run(QUICK if args.quick else CASES, device)
    save_side_report(env, rows, markdown(env, rows), args.out, key="sim_vq",
                     heading="SimVQ", name=args.name, merge_into=args.merge_into)


if __name__ == "__main__":
    main()
