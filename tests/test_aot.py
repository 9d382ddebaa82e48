"""Ahead-of-time compilation of every kernel configuration for sm_80 and sm_90 (no GPU).

Catches what the interpreter forgives: unsupported ops, shared memory over the target's
limit, register spills (ptxas -v), and a distance GEMM that misses the tensor cores.

Runs with the installed triton and with every other triton named in
``VQFAST_AOT_TRITON_PATHS`` (``os.pathsep``-separated folders made with ``pip install
--no-deps --target DIR triton==X``, put first on ``PYTHONPATH``): CI adds triton 3.6.0,
the lent GPU's version, so both ends of the supported range are checked.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("aot_compile.py")


EXTRA_TRITONS = [p for p in os.environ.get("VQFAST_AOT_TRITON_PATHS", "").split(os.pathsep) if p]


@pytest.fixture(scope="module", params=["installed"] + EXTRA_TRITONS)
def records(request):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if request.param != "installed":
        assert Path(request.param, "triton").is_dir(), f"no triton under {request.param}"
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(request.param).resolve())] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-W", "ignore", str(SCRIPT)], capture_output=True,
                          text=True, env=env, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, proc.stderr[-3000:]
    if request.param != "installed":  # the folder's triton compiled these, not the venv's
        version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"],
                                 capture_output=True, text=True, env=env).stdout.strip()
        assert {r["triton"] for r in rows} == {version}
    return rows


def test_every_configuration_compiles_for_both_targets(records):
    errors = [f"{r['name']} {r['target']}: {r['error']}" for r in records if "error" in r]
    assert not errors, "\n".join(errors)
    names = {r["name"] for r in records}
    # every configuration the kernel modules list was compiled (that every launched kernel
    # is listed: tests/test_launch.py, test_every_launched_kernel_is_compiled_ahead_of_time)
    sys.path.insert(0, str(SCRIPT.parent))
    from aot_compile import variants
    assert {v[0] for v in variants()} <= names
    configured = [r for r in records if not r["name"].startswith("jit:")]
    assert {(n, t) for n in names if not n.startswith("jit:") for t in ("sm_80", "sm_90")} == \
        {(r["name"], r["target"]) for r in configured}


def test_every_kernel_module_is_in_the_registry():
    """A module of ``vqfast.kernels`` with a ``@triton.jit`` kernel but no registry entry
    would never be compiled here."""
    import pkgutil

    from vqfast import kernels
    with_kernels = {m.name for m in pkgutil.iter_modules(kernels.__path__)
                    if "@triton.jit" in (Path(kernels.__path__[0]) / f"{m.name}.py").read_text()
                    and not m.name.startswith("_")}
    assert with_kernels == set(kernels.KERNEL_MODULES)


def test_shared_memory_fits(records):
    over = [f"{r['name']} {r['target']}: {r['shared']} > {r['shared_limit']}" for r in records
            if r["shared"] > r["shared_limit"]]
    assert not over, "\n".join(over)


def test_no_register_spills(records):
    spills = [f"{r['name']} {r['target']}: {r['spill_stores']} B spilled, {r['registers']} regs"
              for r in records if r["spill_stores"]]
    assert not spills, "\n".join(spills)


# Kernels with an inter-program hand-off (an atomic ticket: "the last program reduces").
TICKET_KERNELS = ("gather_loss[", "jit:gather_loss[", "lfq_quantize[", "jit:lfq_quantize[")


def ordering_violations(records):
    """What a GPU would pay for or race on: a statistics atomic with ordering semantics (a
    full fence per element), a fence, or a ticket not after a CTA barrier in its block."""
    bad = []
    for r in records:
        ordered = [a for a in r["atomics"] if a[0] == "fence" or a[1] != "relaxed"]
        where = f"{r['name']} {r['target']} (triton {r['triton']})"
        if not r["name"].startswith(TICKET_KERNELS):
            bad += [f"{where}: {a[0]} {a[1]} on a statistics atomic" for a in ordered]
        elif len(ordered) != 1 or ordered[0][0] == "fence":
            bad.append(f"{where}: expected one ordered ticket atomic, got {ordered}")
        elif not ordered[0][2]:
            bad.append(f"{where}: the ticket is not preceded by bar.sync in its basic block")
    return bad


def test_atomics_relaxed_and_tickets_after_a_barrier(records):
    assert any(a[0] in ("atom", "red") for r in records for a in r["atomics"])  # parsed at all
    bad = ordering_violations(records)
    assert not bad, "\n".join(bad)


def test_atomic_check_catches_fenced_atomics_and_unguarded_tickets():
    """The PTX reader and the rule above fail on what they are there to catch."""
    sys.path.insert(0, str(SCRIPT.parent))
    from aot_compile import atomics

    default = atomics("\t@%p7 atom.global.gpu.acq_rel.add.f32 %r1, [ %rd45 + 0 ], %r35;")
    relaxed = atomics("\t@%p7 red.global.gpu.relaxed.add.f32 [ %rd45 + 0 ], %r35;")
    assert default == [["atom", "acq_rel", False]] and relaxed == [["red", "relaxed", False]]
    unguarded = atomics("bar.sync 0;\n$L__BB0_2:\n\tatom.global.gpu.acq_rel.add.u32 %r60, [%rd18], %r59;")
    guarded = atomics("$L__BB0_2:\nbar.sync \t0;\n\tatom.global.gpu.acq_rel.add.u32 %r60, [%rd18], %r59;")
    record = dict(target="sm_90", triton="x")
    assert ordering_violations([dict(record, name="quantize_backward[x]", atomics=default)])
    assert ordering_violations([dict(record, name="gather_loss[x]", atomics=unguarded)])
    assert not ordering_violations([dict(record, name="gather_loss[x]", atomics=relaxed + guarded)])


def test_jit_specializations_of_the_readme_shapes_compile_for_hopper(records):
    """What the JIT really builds on a GPU (divisibility-16 attributes, sizes of 1 as
    constants), recorded from the launchers at the README's shapes, compiles for sm_90."""
    jit = [r for r in records if r["name"].startswith("jit:")]
    assert {r["target"] for r in jit} == {"sm_90"}
    for step in ("VQ-VAE EMA fp32", "VQ-VAE learned bf16", "large EMA bf16",
                 "large EMA bf16 tokens", "large EMA tf32x3"):
        launched = {r["name"].split("[")[0] for r in jit if step in r["name"]}
        assert {"jit:codebook_prep", "jit:nearest_code", "jit:gather_loss",
                "jit:quantize_backward"} <= launched, (step, launched)


def test_channels_first_search_is_pipelined_on_hopper(records):
    """The EMA step's channels-first bf16 search at the large shape, as the JIT builds it for
    sm_90: the x-resident search, on wgmma, its x tile read once with no scalar 16-bit loads
    (they came with a full wait every 16 channels), the code tiles streamed through cp.async,
    spill-free, and small enough that two programs share an SM (one's argmin under the
    other's MMAs: 65536 registers, 228 KiB of shared memory per SM)."""
    search = [r for r in records if r["name"].startswith("jit:nearest_code[")
              and "large EMA bf16" in r["name"].split("[", 1)[1][:-1].split(", ")]
    assert search
    for r in search:
        where = f"{r['name']} (triton {r['triton']}): {r}"
        assert r["constexprs"]["RESIDENT"] is True, where  # the x-resident search
        assert r["wgmma"] and r["num_stages"] >= 2 and r["cp_async"] > 0, where
        assert r["scalar_16bit_loads"] == 0 and r["spill_stores"] == 0, where
        assert r["registers"] <= 128 and r["shared"] + 1024 <= 228 * 1024 // 2, where


def test_tf32x3_search_keeps_two_programs_per_sm_on_hopper(records):
    """The fp32 ``tf32x3`` search at the large shape, as the JIT builds it for sm_90: its
    three tf32 products on wgmma into one accumulator (triton's own split takes a second
    one: 118 registers then), spill-free, in at most 128 registers: two programs per SM."""
    search = [r for r in records if r["name"].startswith("jit:nearest_code[")
              and "large EMA tf32x3" in r["name"].split("[", 1)[1][:-1].split(", ")]
    assert search
    for r in search:
        where = f"{r['name']} (triton {r['triton']}): {r}"
        assert r["constexprs"]["INPUT_PRECISION"] == "tf32x3" and r["wgmma"], where
        assert r["spill_stores"] == 0 and r["registers"] <= 128, where


def test_distance_gemm_uses_tensor_cores(records):
    for r in records:
        if not r["name"].startswith(("nearest_code[", "nearest_code_resident[")):
            continue
        on_tensor_cores = "ieee" not in r["name"] or not r["name"].startswith("nearest_code[fp32")
        instruction = "wgmma" if r["target"] == "sm_90" else "mma"
        assert r[instruction] == on_tensor_cores, (r["name"], r["target"], r)
