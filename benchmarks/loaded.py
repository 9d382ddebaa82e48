"""``python -m benchmarks.loaded``: the CPU path on a quiet and on a loaded machine.

Torch's CPU ops split work over threads; on a machine other jobs share, a descheduled
thread stalls every parallel op it takes part in, and a step of many small ops loses most.
This benchmark times the EMA training step (forward, backward, update) of the original
algorithm (``vqfast.reference``) and of vqfast's torch path, and residual VQ against
vector-quantize-pytorch's ``ResidualVQ``, at 1 and 2 threads, first on the machine as it
is, then with two busy processes (a Python loop each) that it starts and stops itself;
every ratio side by side in one run. Median of ``torch.utils.benchmark``'s blocked
autorange (at least ``--seconds`` per case).

    python -m benchmarks.loaded --out benchmarks/results
"""

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

import vqfast
from vqfast import reference

from .measure import save_report


@contextlib.contextmanager
def busy_processes(count: int):
    """``count`` processes spinning a Python loop for the duration (none when 0)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5 if procs else 0)  # let them reach the cores
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _vqp_residual():
    try:
        from vector_quantize_pytorch import ResidualVQ
    except ImportError:
        return None
    return ResidualVQ(dim=128, num_quantizers=8, codebook_size=1024, decay=0.99,
                      kmeans_init=False, commitment_weight=0.25)


def cases():
    """(case, baseline name, {implementation: (module builder, input shape, channels last)})."""
    ema = dict(
        reference=(lambda: reference.VectorQuantizerEMA(512, 64, 0.25, 0.99), (256, 64, 8, 8), False),
        vqfast=(lambda: vqfast.VectorQuantizerEMA(512, 64, backend="torch",
                                                  **vqfast.ORIGINAL_ALGORITHM), (256, 64, 8, 8), False))
    residual = {
        "vector-quantize-pytorch": (_vqp_residual, (8, 1024, 128), True),
        "vqfast": (lambda: vqfast.ResidualVQ(8, 1024, 128, backend="torch", kmeans_init=False,
                                             dead_code_threshold=0.0, channel_last=True),
                   (8, 1024, 128), True)}
    return [("EMA step, VQ-VAE shape (N=16384, D=64, K=512)", "reference", ema),
            ("residual EMA step (8 levels, K=1024, D=128, N=8192)", "vector-quantize-pytorch",
             residual)]


def _step_fn(module, x):
    module.train()

    def step():
        out = module(x)
        loss, q = (out[2].sum(), out[0]) if isinstance(out[1], torch.Tensor) and \
            out[1].dtype == torch.int64 else (out[0], out[1])
        (loss + q.float().mean()).backward()
    return step


def run(threads=(1, 2), seconds: float = 2.0, progress=print):
    rows = []
    for loaded in (False, True):
        with busy_processes(2 if loaded else 0):
            for t in threads:
                torch.set_num_threads(t)
                for case, baseline, impls in cases():
                    times = {}
                    for name, (build, shape, _) in impls.items():
                        torch.manual_seed(0)
                        module = build()
                        if module is None:
                            continue
                        x = torch.randn(*shape, requires_grad=True)
                        step = _step_fn(module, x)
                        step()  # warm-up
                        times[name] = Timer("step()", globals={"step": step}, num_threads=t) \
                            .blocked_autorange(min_run_time=seconds).median * 1e3
                    ratio = times[baseline] / times["vqfast"] if baseline in times else None
                    row = {"case": case, "loaded": loaded, "threads": t, "ms": times,
                           "vqfast_speedup": ratio}
                    rows.append(row)
                    progress(f"{'loaded' if loaded else 'quiet'} {t} thread(s) {case}: "
                             + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items())
                             + (f" -> {ratio:.1f}x" if ratio else ""))
    return rows


def markdown(env: dict, rows) -> str:
    lines = [f"CPU step times on {env['machine']} ({env['cores']} cores), torch {env['torch']}, "
             f"{env['date']}: quiet, then with two busy processes started by the benchmark; "
             f"one run.", "",
             "| case | machine | threads | baseline ms | vqfast ms | vqfast vs baseline |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        baseline = next((v for k, v in r["ms"].items() if k != "vqfast"), None)
        ratio = r["vqfast_speedup"]
        words = "" if ratio is None else (f"{ratio:.1f}x faster" if ratio >= 1
                                          else f"{1 / ratio:.1f}x slower")
        lines.append(f"| {r['case']} | {'loaded' if r['loaded'] else 'quiet'} | {r['threads']} | "
                     f"{'' if baseline is None else f'{baseline:.1f}'} | {r['ms']['vqfast']:.1f} | "
                     f"{words} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum run time per case")
    parser.add_argument("--out", type=Path, help="write <date>-cpu-loaded.json and .md here")
    args = parser.parse_args(argv)
    rows = run(seconds=args.seconds)
    env = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    save_report(args.out, "cpu-loaded", env, rows, markdown(env, rows))


if __name__ == "__main__":
    main()
