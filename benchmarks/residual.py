"""``python -m benchmarks.residual``: residual, grouped and cosine/factorized VQ.

Three cases, forward + backward of a training step (EMA codebooks), each timed for:
vqfast's fused quantizer, a plain Python loop of vqfast's single quantizer over the
levels (what a user would write without ``ResidualVQ``), and vector-quantize-pytorch
(``ResidualVQ``, ``GroupedResidualVQ``, ``VectorQuantize(use_cosine_sim, codebook_dim)``),
side by side in one run, with peak memory. Inputs are audio-like ``[B, D, T]``, fp32.
On CUDA the fp32 rows keep fp32 products on both sides (vqfast ``precision="ieee"``, torch's
default ``allow_tf32=False``); two more rows run both on TF32 tensor cores (vqfast
``precision="tf32"``, vector-quantize-pytorch under ``torch.backends.cuda.matmul.allow_tf32 =
True``), each speedup measured against vector-quantize-pytorch in the same arithmetic.
"""

import contextlib
import dataclasses
import functools

import torch

import vqfast

from .suite import (environment, measure_into, pick_device, save_side_report, side_parser,
                    side_table, speedup_cell)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    n: int
    d: int
    k: int
    levels: int = 1
    groups: int = 1
    cosine: bool = False
    codebook_dim: int | None = None

    @property
    def shape(self):
        """``[B, D, T]`` with ``T = 1024`` (or N when smaller)."""
        t = min(self.n, 1024)
        return (self.n // t, self.d, t)


CASES = [
    Case("codec RVQ", 32768, 128, 1024, levels=8),
    Case("grouped codec RVQ", 32768, 128, 1024, levels=4, groups=2),
    Case("tokenizer cosine", 8192, 768, 8192, cosine=True, codebook_dim=32),
]
QUICK = [dataclasses.replace(c, n=512, k=min(c.k, 64)) for c in CASES]


@dataclasses.dataclass
class Row:
    case: str
    impl: str
    n: int
    d: int
    k: int
    levels: int
    groups: int
    median_ms: float | None = None
    peak_mib: float | None = None
    speedup_vs_peer: float | None = None
    matmul: str = "fp32"
    skipped: str | None = None


# --- one setup factory per implementation: a module and how to run a step with it -----

def setup_vqfast(case: Case, precision: str = "ieee"):
    if case.levels == 1 and case.groups == 1:
        module = vqfast.VectorQuantizerEMA(case.k, case.d, 0.25, cosine=case.cosine,
                                           codebook_dim=case.codebook_dim, precision=precision,
                                           **vqfast.ORIGINAL_ALGORITHM)
    else:  # the algorithm the peer runs here (no k-means, no re-seeding)
        module = vqfast.ResidualVQ(case.levels, case.k, case.d, groups=case.groups,
                                   cosine=case.cosine, codebook_dim=case.codebook_dim,
                                   precision=precision, **vqfast.ORIGINAL_ALGORITHM)

    def step(x):
        loss, q, _, _ = module(x)
        return q, loss
    return module, step


class _LevelLoop(torch.nn.Module):
    """Residual VQ as a user would loop vqfast's single quantizer: one module per level
    (and group), ``r -= q.detach()`` between levels."""

    def __init__(self, case: Case):
        super().__init__()
        self.case = case
        width = case.d // case.groups
        self.levels = torch.nn.ModuleList(
            vqfast.VectorQuantizerEMA(case.k, width, 0.25, **vqfast.ORIGINAL_ALGORITHM)
            for _ in range(case.groups * case.levels))

    def forward(self, x):
        width, outs, loss = self.case.d // self.case.groups, [], 0.0
        for g in range(self.case.groups):
            residual = x[:, g * width:(g + 1) * width]
            total = 0.0
            for level in range(self.case.levels):
                level_loss, q, _, _ = self.levels[g * self.case.levels + level](residual)
                residual = residual - q.detach()
                total = total + q
                loss = loss + level_loss
            outs.append(total)
        return torch.cat(outs, 1), loss


def setup_loop(case: Case):
    if case.levels == 1 and case.groups == 1:
        raise LookupError("a single level: nothing to loop")
    module = _LevelLoop(case)
    return module, module


@contextlib.contextmanager
def _matmul_tf32(enabled: bool):
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def setup_peer(case: Case, tf32: bool = False):
    try:
        import vector_quantize_pytorch as vqp
    except ImportError as error:
        raise LookupError("vector-quantize-pytorch not installed") from error
    common = dict(codebook_size=case.k, decay=0.99, eps=1e-5, commitment_weight=0.25,
                  kmeans_init=False)
    if case.groups > 1:
        module = vqp.GroupedResidualVQ(dim=case.d, groups=case.groups, num_quantizers=case.levels,
                                       **common)
    elif case.levels > 1:
        module = vqp.ResidualVQ(dim=case.d, num_quantizers=case.levels, **common)
    else:
        module = vqp.VectorQuantize(dim=case.d, use_cosine_sim=case.cosine,
                                    codebook_dim=case.codebook_dim, **common)

    def step(x):  # the peer takes channels-last [B, T, D]
        with _matmul_tf32(tf32):
            out = module(x.transpose(1, 2))
        return out[0].transpose(1, 2), out[2].sum()
    return module, step


PEER = "vector-quantize-pytorch"
# name -> (setup, the arithmetic of its distance products); the TF32 pair on CUDA only.
IMPLS = {"vqfast": (setup_vqfast, "fp32"), "vqfast single-quantizer loop": (setup_loop, "fp32"),
         PEER: (setup_peer, "fp32")}
CUDA_IMPLS = {"vqfast (tf32)": (functools.partial(setup_vqfast, precision="tf32"), "tf32"),
              f"{PEER} (tf32)": (functools.partial(setup_peer, tf32=True), "tf32")}


def run(cases, device, progress=print):
    rows = []
    impls = {**IMPLS, **(CUDA_IMPLS if device.type == "cuda" else {})}
    for case in cases:
        x = torch.randn(case.shape, generator=torch.Generator().manual_seed(0)).to(device)
        case_rows = []
        for impl, (setup, matmul) in impls.items():
            row = Row(case.name, impl, case.n, case.d, case.k, case.levels, case.groups,
                      matmul=matmul)

            def make_step(setup=setup):
                module, forward = setup(case)
                module.to(device).train()
                z = x.clone().requires_grad_()

                def step():
                    q, loss = forward(z)
                    (loss + q.float().mean()).backward()
                return step
            measure_into(row, make_step, device)
            progress(f"{case.name:<20} {impl:<30} "
                     + (f"{row.median_ms:10.2f} ms" if row.median_ms else row.skipped))
            case_rows.append(row)
        for row in case_rows:  # against the peer in the same arithmetic
            peer = next((r for r in case_rows if r.impl.startswith(PEER) and r.matmul == row.matmul),
                        None)
            if peer and peer.median_ms and row.median_ms:
                row.speedup_vs_peer = peer.median_ms / row.median_ms
        rows += case_rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def markdown(env, rows) -> str:
    return side_table(env, rows, [
        ("case", lambda r: r.case), ("N", lambda r: str(r.n)), ("D", lambda r: str(r.d)),
        ("K", lambda r: str(r.k)), ("levels x groups", lambda r: f"{r.levels} x {r.groups}"),
        ("implementation", lambda r: r.impl)], [
        ("fwd+bwd ms", lambda r: f"{r.median_ms:.2f}"), ("peak MiB", lambda r: f"{r.peak_mib:.1f}"),
        ("speedup vs vector-quantize-pytorch", lambda r: speedup_cell(r.speedup_vs_peer))])


def main(argv=None):
    args = side_parser("python -m benchmarks.residual", __doc__, "residual",
                       ("--quick", "the three cases at N = 512, K <= 64")).parse_args(argv)
    device = pick_device(args.device)
    env = environment(device)
    rows = run(QUICK if args.quick else CASES, device)
    save_side_report(env, rows, markdown(env, rows), args.out, key="residual",
                     heading="Residual, grouped and cosine VQ", name=args.name,
                     merge_into=args.merge_into)


if __name__ == "__main__":
    main()
