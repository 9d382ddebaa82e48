"""``python -m benchmarks.atomics``: what relaxed statistics atomics buy, side by side.

The EMA quantizer's training step (forward, backward, EMA update) on the Triton path, with
the per-code counts and sums accumulated by ``tl.atomic_add(sem="relaxed")`` (vqfast's
choice: a bare reduction) and by the default ``sem="acq_rel"`` (a full memory fence per
element), in one run. Needs CUDA (or ``--device cpu`` under ``TRITON_INTERPRET=1``, which
checks the pipeline and measures nothing a GPU would pay).
"""

import argparse
import contextlib
import dataclasses
from pathlib import Path

import torch

import vqfast
from vqfast.kernels import _launch

from .measure import median_seconds
from .suite import LARGE, SEED, TINY, environment, save_side_report


@dataclasses.dataclass
class Row:
    shape: str
    dtype: str
    sem: str
    median_ms: float | None
    vs_relaxed: float | None = None
    skipped: str | None = None


@contextlib.contextmanager
def statistics_semantics(sem: str):
    """The statistics atomics' memory semantics for the launches inside (a recompile)."""
    saved, _launch.STATS_SEM = _launch.STATS_SEM, sem
    try:
        yield
    finally:
        _launch.STATS_SEM = saved


def ema_step_ms(shape, dtype, device) -> float:
    torch.manual_seed(0)
    vq = vqfast.VectorQuantizerEMA(shape.k, shape.d, 0.25, backend="triton",
                                   **vqfast.ORIGINAL_ALGORITHM).to(device)
    spatial = 8
    z = torch.randn(shape.n // spatial**2, shape.d, spatial, spatial, device=device,
                    dtype=dtype, requires_grad=True)

    def step():
        loss, q, _, _ = vq(z)
        (loss + q.float().square().mean()).backward()
    return median_seconds(step, device) * 1e3


def run(shapes, dtypes, device):
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            relaxed = None
            for sem in ("relaxed", "acq_rel"):
                name = str(dtype).removeprefix("torch.")
                try:
                    with statistics_semantics(sem):
                        ms = ema_step_ms(shape, dtype, device)
                except Exception as error:  # report, go on with the next case
                    rows.append(Row(shape.name, name, sem, None, skipped=f"error: {error}"[:200]))
                    continue
                relaxed = ms if sem == "relaxed" else relaxed
                rows.append(Row(shape.name, name, sem, ms,
                                vs_relaxed=ms / relaxed if relaxed else None))
                print(rows[-1], flush=True)
    return rows


def markdown(env: dict, rows) -> str:
    lines = [f"EMA training step (forward + backward + EMA update), Triton path, on "
             f"{env.get('device_name', env.get('device_type'))}: statistics atomics relaxed "
             f"vs acq_rel, one run.", "",
             "| shape | dtype | atomics | step ms | vs relaxed |", "|---|---|---|---:|---:|"]
    for r in rows:
        if r.median_ms is None:
            lines.append(f"| {r.shape} | {r.dtype} | {r.sem} | {r.skipped} | |")
            continue
        ratio = (f"{r.vs_relaxed:.2f}x ({'slower' if r.vs_relaxed > 1 else 'faster'})"
                 if r.vs_relaxed and r.sem != "relaxed" else "")
        lines.append(f"| {r.shape} | {r.dtype} | {r.sem} | {r.median_ms:.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.atomics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="one tiny shape: the pipeline only")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    parser.add_argument("--name", default=None)
    parser.add_argument("--merge-into", default=None, metavar="STEM",
                        help="add the results to OUT/STEM.json (key atomics) and STEM.md")
    args = parser.parse_args(argv)
    device = (torch.device("cuda" if torch.cuda.is_available() else "cpu")
              if args.device == "auto" else torch.device(args.device))
    shapes = [TINY] if args.tiny else [SEED, LARGE]
    dtypes = [torch.float32] if args.tiny else [torch.bfloat16, torch.float32]
    env = environment(device)
    rows = run(shapes, dtypes, device)
    save_side_report(env, rows, markdown(env, rows), args.out, key="atomics",
                     heading="Statistics atomics: relaxed vs acq_rel", name=args.name,
                     merge_into=args.merge_into)


if __name__ == "__main__":
    main()
