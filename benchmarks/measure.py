"""Time and peak-memory measurement on CPU and CUDA."""

import contextlib
import os
import sys
import time

import torch


@contextlib.contextmanager
def quiet_stderr():
    """Silence the C++ side's stderr (kineto prints ``USDT: profiler_start/stop`` lines
    on every profile) for the duration; Python's own stderr is flushed first."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# CPU times are taken on one thread (torch.utils.benchmark's default): two threads on a
# machine other jobs share wait on each other and vary tenfold. The reports say so.
CPU_TIMING_THREADS = 1


def median_seconds(fn, device: torch.device) -> float:
    """Median wall time of ``fn()`` after warm-up: ``do_bench`` on CUDA, ``torch.utils.benchmark`` on CPU."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    from torch.utils.benchmark import Timer
    fn()
    return Timer("fn()", globals={"fn": fn}, num_threads=CPU_TIMING_THREADS
                 ).blocked_autorange(min_run_time=0.5).median


def one_call_seconds(fn, device: torch.device) -> float:
    """One call's wall time, the device synchronised around it (``--quick`` runs: tiny
    sizes, where only the pipeline is tested)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def timing_threads(device: torch.device):
    """Run the body on ``CPU_TIMING_THREADS`` threads on a CPU (as ``median_seconds``
    times), so every time in one report is taken the same way."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(CPU_TIMING_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def _cpu_peak_bytes(fn) -> int:
    """Peak bytes above the starting level that torch's CPU allocator held during ``fn()``.

    Reads the allocator's running total off the profiler's allocation events
    (``profile_memory=True``), so it sees every tensor torch allocates, temporaries included.
    """
    from torch.profiler import ProfilerActivity, profile
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    tree = prof.profiler.kineto_results.experimental_event_tree()
    allocs = sorted(
        ((n.start_time_ns, n.extra_fields) for n in _walk(tree)
         if type(n.extra_fields).__name__ == "_ExtraFields_Allocation"
         and n.extra_fields.device.type == "cpu"),
        key=lambda item: item[0])
    if not allocs:
        return 0
    first = allocs[0][1]
    baseline = first.total_allocated - first.alloc_size
    return max(e.total_allocated for _, e in allocs) - baseline


def peak_extra_bytes(fn, device: torch.device) -> int:
    """Peak memory ``fn()`` allocates above what was live before it (its outputs included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return _cpu_peak_bytes(fn)


def save_report(out, name: str, env: dict, rows, text: str) -> None:
    """Print a benchmark's markdown ``text``; with ``out`` (a folder), also write
    ``<date>-<name>.json`` (``env`` and ``rows``) and ``.md`` there."""
    import json
    print(text)
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{env['date']}-{name}"
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "results": rows},
                                                    indent=1))
    stem.with_suffix(".md").write_text(text)
    print(f"saved to {stem}.json and {stem}.md")
