"""Compile every vqfast kernel ahead of time for sm_80 and sm_90, no GPU needed.

For every block configuration its launcher can pick: ``triton.compile`` for each target,
the shared memory it needs against the target's limit, and the ``ptxas`` shipped in the
triton wheel (``-v``) for registers and spill stores. Prints one JSON object per
(variant, target); exits 1 if any compile failed. Run with ``TRITON_INTERPRET`` unset
(``@triton.jit`` must build real JITFunctions): ``tests/test_aot.py`` does so.
"""

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.host: the JIT's builds

# Every kernel module lists its own launchable configurations (``aot_variants``), beside
# the kernel and its launcher; ``vqfast.kernels.KERNEL_MODULES`` is the one registry of
# them: a new kernel or config is compiled and spill-checked here.
# importlib: the package re-exports launchers under their modules' names.
from vqfast.kernels import KERNEL_MODULES  # noqa: E402
TARGETS = {80: 163 * 1024, 90: 227 * 1024}  # compute capability -> max shared memory per block


def variants():
    """(name, kernel, signature, constexprs, options) for every launchable configuration:
    each twice, with a runtime S ([B, D, S] inputs) and with S == 1, which triton's JIT
    specialises to a constant for [N, D] inputs."""
    for module in KERNEL_MODULES:
        for name, kernel, sig, consts, options in importlib.import_module(
                f"vqfast.kernels.{module}").aot_variants():
            yield name + "[S]", kernel, sig, consts, options
            if "S" in sig:
                yield name + "[S=1]", kernel, sig, dict(consts, S=1), options


def _ptxas_path(capability: int) -> str:
    """The ptxas triton itself uses for this target (3.9 ships a newer one for sm_90+)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(capability).path
    except ImportError:
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def _ptxas(ptx: str, capability: int) -> dict:
    arch = "sm_90a" if capability == 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([_ptxas_path(capability), "-v", "--gpu-name", arch, str(path), "-o", str(path) + ".o"],
                             capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    regs = re.search(r"Used (\d+) registers", out)
    return {"spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2)),
            "registers": int(regs.group(1))}


_ATOMIC = re.compile(r"^\s*(?:@%\w+\s+)?(atom|red)\.([\w.]+)")
_ORDERING = ("acq_rel", "acquire", "release", "seq_cst")


def atomics(ptx: str) -> list:
    """Every atomic (``atom``/``red``) and fence of the PTX, in order: ``[kind, semantics,
    barrier_before]``, semantics ``relaxed`` where none is written (PTX's default), and
    whether a ``bar.sync`` precedes it in the same basic block (blocks start at ``$L__BB``
    labels and end at branches)."""
    found, barrier = [], False
    for line in ptx.splitlines():
        text = line.split("//")[0].strip()
        if text.startswith("$L__BB") or re.match(r"(@%\w+\s+)?bra(\.uni)?\s", text) or text.startswith("ret"):
            barrier = False
        if re.match(r"(@%\w+\s+)?(bar\.sync|barrier\.sync)", text):
            barrier = True
        match = _ATOMIC.match(text)
        if match:
            sem = next((q for q in match.group(2).split(".") if q in _ORDERING), "relaxed")
            found.append([match.group(1), sem, barrier])
        elif re.match(r"(@%\w+\s+)?(fence|membar)\b", text) and ".proxy." not in text:
            # (fence.proxy.async orders the tensor-core pipeline's shared memory, not threads)
            found.append(["fence", text.split()[0], barrier])
    return found


def jit_specializations():
    """The kernels as triton's JIT specialises them at the README's shapes (a GPU user's):
    divisibility-16 attributes of aligned pointers and sizes, sizes of 1 as constants, the
    launch options. Recorded by the launchers themselves on CPU stand-in tensors, through
    triton's own binder (``benchmarks.host.record_specializations``)."""
    from benchmarks.host import record_specializations
    return record_specializations()


def _short(kernel_name: str) -> str:
    return kernel_name.strip("_").removesuffix("_kernel")


def compile_one(job):
    index, capability = job
    if isinstance(index, dict):  # a JIT specialisation: compiled as the JIT compiles it
        spec = index
        name = f"jit:{_short(spec['kernel'])}[{', '.join(spec['cases'])}]"
        from benchmarks.host import compile_recorded
        build = lambda: compile_recorded(spec, GPUTarget("cuda", capability, 32))  # noqa: E731
    else:
        name, kernel, sig, consts, options = list(variants())[index]
        build = lambda: triton.compile(  # noqa: E731
            ASTSource(fn=kernel, signature={**sig, **{k: "constexpr" for k in consts}},
                      constexprs=consts),
            target=GPUTarget("cuda", capability, 32), options=options)
    record = {"name": name, "target": f"sm_{capability}", "triton": triton.__version__}
    if isinstance(index, dict):  # which constexprs the JIT's build had, by name
        record["constexprs"] = spec["constants"]
    try:
        compiled = build()
        ptx = compiled.asm["ptx"]
        record.update(shared=compiled.metadata.shared, shared_limit=TARGETS[capability],
                      mma="mma.sync" in ptx, wgmma="wgmma" in ptx, atomics=atomics(ptx),
                      cp_async=len(re.findall(r"cp\.async\.c[ag]\.shared", ptx)),
                      scalar_16bit_loads=sum(1 for op in re.findall(r"ld\.global[.\w]*", ptx)
                                             if op.endswith("16") and ".v" not in op),
                      num_stages=compiled.metadata.num_stages, **_ptxas(ptx, capability))
    except Exception as error:  # report every failure, not just the first
        record["error"] = f"{type(error).__name__}: {error}"[:2000]
    return record


def main():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: AOT compilation needs real JITFunctions")
    jobs = [(i, cap) for i in range(len(list(variants()))) for cap in TARGETS]
    # ... and every specialisation the JIT builds at the README's shapes, for Hopper
    jobs += [(spec, 90) for spec in jit_specializations()]
    failed = False
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for record in pool.map(compile_one, jobs):
            failed |= "error" in record
            print(json.dumps(record), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
