"""Every kernel build triton compiles, or finds in its cache, while the GPU command runs:
one JSON line each in ``$VQFAST_COMPILE_LOG`` with the part running (``$VQFAST_PART``), so
the run says what its carried Triton cache (``benchmarks.gpu.cache``) missed, part by part.
Installed by ``benchmarks`` and the test suite where the variable is set."""

import collections
import json
import os
from pathlib import Path


_CALLBACKS = []  # on_build callbacks of the one listener installed


def install(on_build=None) -> None:
    """Log every build (if ``$VQFAST_COMPILE_LOG`` is set) and call ``on_build(kernel,
    cache_hit)`` for each, through triton's compilation listener (installed once a
    process; a later call only adds its callback)."""
    path = os.environ.get("VQFAST_COMPILE_LOG")
    if on_build is not None:
        _CALLBACKS.append(on_build)
    from triton import knobs
    if getattr(knobs.compilation.listener, "_vqfast_compile_log", False):
        return
    if not path and on_build is None:
        return
    previous = knobs.compilation.listener

    def listener(*, src, cache_hit, **kwargs):
        kernel = getattr(getattr(src, "fn", None), "__name__", "?")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"part": os.environ.get("VQFAST_PART", ""),
                                    "kernel": kernel, "cache_hit": bool(cache_hit)}) + "\n")
        for callback in _CALLBACKS:
            callback(kernel, cache_hit)
        if previous is not None:
            previous(src=src, cache_hit=cache_hit, **kwargs)
    listener._vqfast_compile_log = True
    knobs.compilation.listener = listener


def counts(path: Path) -> dict:
    """``part -> [compiled here, found in the cache]`` from a log."""
    parts = collections.defaultdict(lambda: [0, 0])
    if path.exists():
        for line in path.read_text().splitlines():
            build = json.loads(line)
            parts[build["part"]][1 if build["cache_hit"] else 0] += 1
    return dict(parts)


def markdown(path: Path) -> str:
    parts = counts(path)
    if not parts:
        return "(no kernel builds logged)"
    lines = ["| part | kernel builds compiled here | found in triton's cache |", "|---|---:|---:|"]
    lines += [f"| {part or '(none)'} | {here} | {cached} |" for part, (here, cached) in parts.items()]
    return "\n".join(lines)
