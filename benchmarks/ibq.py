"""``python -m benchmarks.ibq``: index backpropagation quantization, streamed vs ``[N, K]``.

Forward + backward of IBQ (the gradient reaches every code through a softmax over all K)
at K = 16,384 and K = 262,144: vqfast's ``IndexBackpropVQ`` (logits streamed in tiles,
memory ``O(N * D + K * D)``; the fused Triton kernels on CUDA, the torch path elsewhere) against the plain torch implementation the reference code
uses (``vqfast.reference.ibq``: ``[N, K]`` logits, softmax, one-hot), fp32, side by side in
one run: median time and peak memory. The plain one is not run where its ``[N, K]``
tensors would not fit (its estimate is reported), and an out-of-memory is reported as such.
"""

import dataclasses

import torch

import vqfast
from vqfast import reference

from .suite import (environment, measure_into, pick_device, save_side_report, side_parser,
                    side_table, speedup_cell)


@dataclasses.dataclass(frozen=True)
class Case:
    n: int
    d: int
    k: int


CASES = [Case(2048, 64, 16384), Case(2048, 64, 262144)]
# (D = 128: the widest rows the fused Triton kernels take; wider ones run the torch path)
CUDA_CASES = [Case(16384, 128, 16384), Case(16384, 128, 262144)]
QUICK = [Case(128, 16, 64), Case(128, 16, 512)]
PLAIN = "plain torch [N, K]"
PLAIN_TENSORS = 8  # [N, K] fp32 tensors the plain forward + backward holds at its peak


@dataclasses.dataclass
class Row:
    impl: str
    n: int
    d: int
    k: int
    median_ms: float | None = None
    peak_mib: float | None = None
    speedup_vs_plain: float | None = None
    skipped: str | None = None


def run(cases, device, budget_bytes: float, progress=print):
    rows = []
    for case in cases:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(case.n, case.d, generator=g).to(device)
        module = vqfast.IndexBackpropVQ(case.k, case.d, channel_last=True).to(device)
        codebook = module.codebook.detach().clone().requires_grad_()
        z = x.clone().requires_grad_()

        def ours(z=z, module=module):
            loss, q, _, _ = module(z)
            (loss + q.mean()).backward()

        def plain(z=z, codebook=codebook):
            out, loss, _ = reference.ibq(z, codebook)
            (loss + out.mean()).backward()
        case_rows = []
        for impl, step in (("vqfast (streamed)", ours), (PLAIN, plain)):
            row = Row(impl, case.n, case.d, case.k)
            need = PLAIN_TENSORS * case.n * case.k * 4
            if impl == PLAIN and need > budget_bytes:
                row.skipped = f"needs ~{need / 2**30:.0f} GiB: not run"
            else:
                measure_into(row, lambda step=step: step, device)
            progress(f"K={case.k:<7} {impl:<20} "
                     + (f"{row.median_ms:10.1f} ms" if row.median_ms else row.skipped))
            case_rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        plain_row = case_rows[1]
        if plain_row.median_ms and case_rows[0].median_ms:
            case_rows[0].speedup_vs_plain = plain_row.median_ms / case_rows[0].median_ms
        rows += case_rows
    return rows


def markdown(env, rows) -> str:
    return side_table(env, rows, [
        ("N", lambda r: str(r.n)), ("D", lambda r: str(r.d)), ("K", lambda r: str(r.k)),
        ("implementation", lambda r: r.impl)], [
        ("fwd+bwd ms", lambda r: f"{r.median_ms:.1f}"), ("peak MiB", lambda r: f"{r.peak_mib:.1f}"),
        ("vs plain", lambda r: speedup_cell(r.speedup_vs_plain))])


def main(argv=None):
    parser = side_parser("python -m benchmarks.ibq", __doc__, "ibq", ("--quick", "N = 128, K <= 512"))
    parser.add_argument("--memory-budget-gib", type=float, default=None,
                        help="run the plain [N, K] implementation only below this estimate "
                             "(default: 8 GiB on CPU, the GPU's memory on CUDA)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    budget = (args.memory_budget_gib * 2**30 if args.memory_budget_gib is not None
              else torch.cuda.get_device_properties(device).total_memory
              if device.type == "cuda" else 8 * 2**30)
    cases = QUICK if args.quick else CUDA_CASES if device.type == "cuda" else CASES
    env = environment(device)
    rows = run(cases, device, budget)
    save_side_report(env, rows, markdown(env, rows), args.out, key="ibq",
                     heading="Index backpropagation (IBQ): streamed vs [N, K]", name=args.name,
                     merge_into=args.merge_into)


if __name__ == "__main__":
    main()
