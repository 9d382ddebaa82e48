"""``python -m benchmarks``: vqfast vs the reference vs vector-quantize-pytorch, time and memory."""

import argparse
from pathlib import Path

import torch

from . import suite


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="the VQ-VAE shape and a short K sweep only (about a minute and 2.2 GB on a "
                           "2-core CPU)")
    size.add_argument("--headline", action="store_true",
                      help="the VQ-VAE and large shapes, nearest code and EMA step only (the GPU "
                           "command's bench part)")
    size.add_argument("--tiny", action="store_true",
                      help="one tiny shape: checks the pipeline in seconds, measures nothing useful")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:i]")
    parser.add_argument("--ops", nargs="+", choices=suite.OPS, default=list(suite.OPS))
    parser.add_argument("--impls", nargs="+", choices=suite.IMPLS, default=list(suite.IMPLS))
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"],
                        default=None, help="default: float32 on CPU, all three on CUDA")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"),
                        help="output folder (default ./benchmark-results, git-ignored; the "
                             "committed runs live in benchmarks/results/)")
    parser.add_argument("--name", default=None,
                        help="file name stem of the outputs (default: date, device, size)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else torch.device(args.device)
    dtype_names = args.dtypes or (["bfloat16", "float32"] if device.type == "cuda" and args.headline
                                  else ["float32", "bfloat16", "float16"] if device.type == "cuda"
                                  else ["float32"])
    dtypes = [getattr(torch, name) for name in dtype_names]

    env = suite.environment(device)
    if args.tiny:
        groups = [([suite.TINY], args.ops)]
        tag = "tiny"
    elif args.headline:
        groups = [([suite.SEED, suite.LARGE], ["nearest", "ema_step"])]
        tag = "headline"
    elif args.quick:
        groups = [([suite.SEED], args.ops), (suite.QUICK_K_SWEEP, ["nearest", "ema_step"])]
        tag = "quick"
    else:
        groups = [([suite.SEED, suite.LARGE], args.ops), (suite.K_SWEEP, ["nearest", "ema_step"]),
                  (suite.N_SWEEP, ["ema_step"])]
        tag = "full"
    results = []
    for shapes, ops in groups:
        ops = [op for op in ops if op in args.ops]
        results += suite.run(shapes, ops, args.impls, device, dtypes)
    print()
    note = ("pipeline check (--tiny): sizes too small to measure anything; see a full or "
            "--quick run for numbers" if args.tiny else None)
    print(suite.markdown(env, results, note))
    for kind, path in suite.save(env, results, args.out, tag, args.name, note).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
