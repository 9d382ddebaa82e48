"""``python -m benchmarks.encode``: tokenizing at scale, codes only (no training).

Encoding a dataset into codes (a language model's data pipeline) needs the nearest code
and nothing else. Three cases, each timed in eval mode under ``torch.inference_mode`` for:
vqfast's ``encode`` (the search alone), vqfast's eval-mode forward (search, gather, loss,
perplexity), and vector-quantize-pytorch's eval-mode forward (its ``VectorQuantize`` /
``ResidualVQ``, which also returns the quantized vectors), side by side in one run. Reports
the median time, vectors per second and peak memory. fp32 everywhere; on CUDA also bf16
inputs (vqfast keeps its codebook fp32 and accumulates distances in fp32).
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
                try:
                    module, encode = setup(case)
                    module.to(device).eval()

                    def step(encode=encode):
                        with torch.inference_mode():
                            return encode(x)
                    step()
                    row.median_ms = median_seconds(step, device) * 1e3
                    row.vectors_per_s = case.n / (row.median_ms / 1e3)
                    row.peak_mib = peak_extra_bytes(step, device) / 2**20
                except LookupError as reason:
                    row.skipped = str(reason)
                except Exception as error:  # one failing case must not end the run
                    row.skipped = f"error: {type(error).__name__}: {str(error)[:120]}"
                progress(f"{case.name:<16} {row.dtype:<9} {impl:<24} "
                         + (f"{row.median_ms:10.2f} ms" if row.median_ms else row.skipped))
                case_rows.append(row)
            peer = next((r for r in case_rows if r.impl == PEER and r.median_ms), None)
            for row in case_rows:
                if peer and row.median_ms:
                    row.speedup_vs_peer = peer.median_ms / row.median_ms
            rows += case_rows
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def markdown(env, rows) -> str:
    lines = [device_line(env), "",
             "| case | N | D | K | levels | dtype | implementation | ms | vectors/s | peak MiB | speedup vs peer |",
             "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r.case} | {r.n} | {r.d} | {r.k} | {r.levels} | {r.dtype} | {r.impl} |"
        if r.skipped:
            lines.append(f"{head} skipped: {r.skipped} | | | |")
            continue
        speedup = f"{r.speedup_vs_peer:.1f}x" if r.speedup_vs_peer else ""
        lines.append(f"{head} {r.median_ms:.2f} | {r.vectors_per_s / 1e6:.2f} M | "
                     f"{r.peak_mib:.1f} | {speedup} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encode", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the three cases at N = 512, K <= 64")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    parser.add_argument("--name", default=None)
    parser.add_argument("--merge-into", default=None, metavar="STEM",
                        help="add the results to OUT/STEM.json (key encode) and STEM.md")
    args = parser.parse_args(argv)
    device = (torch.device("cuda" if torch.cuda.is_available() else "cpu")
              if args.device == "auto" else torch.device(args.device))
    env = environment(device)
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    rows = run(QUICK if args.quick else CASES, device, dtypes)
    save_side_report(env, rows, markdown(env, rows), args.out, key="encode",
                     heading="Encode: codes only, eval mode", name=args.name,
                     merge_into=args.merge_into)


if __name__ == "__main__":
    main()
