"""``python -m benchmarks.encode``: tokenizing at scale, codes only (no training).

Encoding a dataset into codes (a language model's data pipeline) needs the nearest code
and nothing else. Three cases, each timed in eval mode under ``torch.inference_mode`` for:
vqfast's ``encode`` (the search alone), vqfast's eval-mode forward (search, gather, loss,
perplexity), and vector-quantize-pytorch's eval-mode forward (its ``VectorQuantize`` /
``ResidualVQ``, which also returns the quantized vectors), side by side in one run. Reports
the median time, vectors per second and peak memory. fp32 everywhere; on CUDA also bf16
inputs (vqfast keeps its codebook fp32 and accumulates distances in fp32).
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
    levels: int = 1

    @property
    def shape(self):
        """Tokens ``[B, T, D]`` (channel-last: how a transformer tokenizer holds them)."""
        t = min(self.n, 1024)
        return (self.n // t, t, self.d)


CASES = [
    Case("image tokenizer", 65536, 256, 1024),
    Case("large codebook", 16384, 64, 16384),
    Case("codec RVQ", 32768, 128, 1024, levels=8),
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
    dtype: str
    median_ms: float | None = None
    vectors_per_s: float | None = None
    peak_mib: float | None = None
    speedup_vs_peer: float | None = None
    skipped: str | None = None


def _vqfast(case: Case):
    if case.levels == 1:
        return vqfast.VectorQuantizerEMA(case.k, case.d, channel_last=True)
    return vqfast.ResidualVQ(case.levels, case.k, case.d, channel_last=True)


def setup_encode(case: Case):
    module = _vqfast(case)
    return module, module.encode


def setup_forward(case: Case):
    module = _vqfast(case)
    return module, lambda x: module(x)[3]


def setup_peer(case: Case):
    try:
        import vector_quantize_pytorch as vqp
    except ImportError as error:
        raise LookupError("vector-quantize-pytorch not installed") from error
    common = dict(dim=case.d, codebook_size=case.k, decay=0.99, commitment_weight=0.25)
    module = (vqp.VectorQuantize(**common) if case.levels == 1
              else vqp.ResidualVQ(num_quantizers=case.levels, **common))
    return module, lambda x: module(x)[1]


PEER = "vector-quantize-pytorch"
IMPLS = {"vqfast encode": setup_encode, "vqfast eval forward": setup_forward, PEER: setup_peer}


def run(cases, device, dtypes=(torch.float32,), progress=print):
    rows = []
    for case in cases:
        for dtype in dtypes:
            x = torch.randn(case.shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
            case_rows = []
            for impl, setup in IMPLS.items():
                row = Row(case.name, impl, case.n, case.d, case.k, case.levels,
                          str(dtype).removeprefix("torch."))

                def make_step(setup=setup, x=x):
                    module, encode = setup(case)
                    module.to(device).eval()

                    def step():
                        with torch.inference_mode():
                            return encode(x)
                    return step
                measure_into(row, make_step, device)
                if row.median_ms:
                    row.vectors_per_s = case.n / (row.median_ms / 1e3)
                progress(f"{case.name:<16} {row.dtype:<9} {impl:<24} "
                         + (f"{row.median_ms:10.2f} ms" if row.median_ms else row.skipped))
                case_rows.append(row)
            set_speedups(case_rows, PEER)
            rows += case_rows
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def markdown(env, rows) -> str:
    return side_table(env, rows, [
        ("case", lambda r: r.case), ("N", lambda r: str(r.n)), ("D", lambda r: str(r.d)),
        ("K", lambda r: str(r.k)), ("levels", lambda r: str(r.levels)),
        ("dtype", lambda r: r.dtype), ("implementation", lambda r: r.impl)], [
        ("ms", lambda r: f"{r.median_ms:.2f}"),
        ("vectors/s", lambda r: f"{r.vectors_per_s:,.0f}"),
        ("peak MiB", lambda r: f"{r.peak_mib:.1f}"),
        ("speedup vs vector-quantize-pytorch", lambda r: speedup_cell(r.speedup_vs_peer, ".1f"))])


def main(argv=None):
    args = side_parser("python -m benchmarks.encode", __doc__, "encode",
                       ("--quick", "the three cases at N = 512, K <= 64")).parse_args(argv)
    device = pick_device(args.device)
    env = environment(device)
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    rows = run(QUICK if args.quick else CASES, device, dtypes)
    save_side_report(env, rows, markdown(env, rows), args.out, key="encode",
                     heading="Encode: codes only, eval mode", name=args.name,
                     merge_into=args.merge_into)


if __name__ == "__main__":
    main()
