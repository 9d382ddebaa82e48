"""The GPU performance model's reading of SASS (benchmarks/gpu/model.py), on hand-written
SASS whose answer is known: loops, tensor-core work, bytes, and what waits for what."""

import pytest

from benchmarks.gpu import model

# A search-shaped kernel: a prologue, a loop (0x0040..0x00c0) with two HGMMAs of
# 64x128x16 bf16 and a cp.async operand stream, a wait for all MMAs, an argmin, a loop
# back; an epilogue with a store.
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.64 R2, desc[UR4][R2.64] ;
        /*0020*/                   IMAD R3, R3, R4, RZ ;
        /*0030*/                   NOP ;
        /*0040*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64], P0 ;
        /*0050*/                   LDGDEPBAR ;
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspA, R24 ;
        /*0070*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12].tnspA, R24, gsb0 ;
        /*0080*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0090*/                   LDG.E R7, desc[UR4][R8.64] ;
        /*00a0*/                   FMNMX R9, R9, R10, PT ;
        /*00b0*/                   FSETP.GT.AND P1, PT, R9, R10, PT ;
        /*00c0*/              @!P0 BRA 0x40 ;
        /*00d0*/                   STG.E.64 desc[UR4][R2.64], R12 ;
        /*00e0*/                   EXIT ;
        /*00f0*/                   BRA 0xf0;
"""


def test_loops_work_and_bytes_are_read_off_the_sass():
    loops, blocks = model.parse_sass(SASS)
    assert loops == [(0x40, 0xc0)]
    body, outside = blocks[(0,)], blocks[()]
    assert body.instructions == 9 and outside.instructions == 4  # NOP, EXIT, the tail BRA: none
    assert body.mma_flops == {"BF16": 2 * 2 * 64 * 128 * 16}
    assert body.async_copies == 1 and body.load_bytes == 32 * 16  # LDGDEPBAR moves nothing
    assert body.cached_load_bytes == 32 * 4  # a plain load beside a cp.async stream: L1
    assert outside.load_bytes == 32 * 8 and outside.store_bytes == 32 * 8
    assert body.mma_waited and not outside.mma_waited


def test_an_mma_waited_on_costs_more_than_one_in_flight():
    """The same loop, once with the argmin waiting for every MMA (wait 0x0) and once with
    one group left in flight (0x1): the model must tell them apart."""
    launch = {"kernel": "_toy_kernel", "grid": (132, 1, 1), "args": {"D": 256},
              "consts": {"BLOCK_D": 16}}
    times = {}
    for wait in ("0x0", "0x1"):
        build = {"sass": SASS.replace("gsb0, 0x0", f"gsb0, {wait}"), "registers": 160,
                 "shared": 100 * 1024, "num_warps": 8, "num_stages": 1}
        times[wait] = model.kernel_time(model.GPUS[0], launch, build)["us"]
    assert times["0x0"] > times["0x1"]


def test_a_kernel_whose_loops_the_rule_does_not_know_is_refused():
    with pytest.raises(ValueError, match="loops in its SASS"):
        model.trip_counts("_nearest_code_kernel", [(0, 1)], {"K": 512, "D": 64},
                          {"BLOCK_K": 128, "BLOCK_D": 16})


def test_occupancy_from_registers_and_shared_memory():
    gpu = model.GPUS[0]
    assert model.programs_per_sm(gpu, 103, 96 * 1024, 8) == 2  # the x-resident search
    assert model.programs_per_sm(gpu, 167, 24 * 1024, 8) == 1  # registers bound it
    assert model.programs_per_sm(gpu, 32, 120 * 1024, 4) == 1  # shared memory bounds it


@pytest.mark.slow
def test_precompile_check_fails_on_a_miss_and_passes_after_the_build(tmp_path):
    """``benchmarks.gpu.precompile --check``: a launch whose kernel is not in triton's cache
    is a miss (named), and after the pool built it, a hit; a second build compiles nothing.
    Real triton, an empty cache."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = (
        "import json\n"
        "from benchmarks.gpu import precompile as P\n"
        "from benchmarks.host import record_specializations\n"
        "specs = [s for s in record_specializations(P.steps('vqvae')[:1])\n"
        "         if s['kernel'] == '_ema_scalars_kernel']\n"
        "gpu = P.target()\n"
        "print(json.dumps([P.run(specs, gpu, 1, check) for check in (True, False, True, False)]))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, built, after, again = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(before) == 1 and "not in the cache" in before[0][2] and "VQ-VAE" in before[0][2]
    assert built[0][2] is None and after[0][2] is None
    assert built[0][3] and not again[0][3]  # compiled, then found in the cache


@pytest.mark.slow
def test_the_readme_command_writes_the_table_and_prediction(tmp_path):
    """``python -m benchmarks.gpu.model --out DIR --prediction FILE`` (README "Running on a
    GPU"), for one step: a row per GPU in the printed table and in DIR, and the model's
    section written into a copy of PREDICTION.md."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    prediction = tmp_path / "PREDICTION.md"
    shutil.copy(repo / "benchmarks/gpu/PREDICTION.md", prediction)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "benchmarks.gpu.model", "--step", "VQ-VAE EMA bf16",
         "--out", str(tmp_path), "--prediction", str(prediction)],
        capture_output=True, text=True, env=env, cwd=repo, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for gpu in model.GPUS:
        assert f"| VQ-VAE EMA bf16 | {gpu.name} | " in proc.stdout, proc.stdout
    written = list(tmp_path.glob("*-model.md"))
    assert len(written) == 1 and written[0].read_text() in proc.stdout
    section = prediction.read_text().split(model.SECTION)[1].split("\n## ")[0]
    assert section.count("| VQ-VAE EMA bf16 |") == len(model.GPUS)


@pytest.mark.slow
def test_carried_cache_is_built_checked_and_installed_elsewhere(tmp_path):
    """``benchmarks.gpu.cache``: built for a target Python (here this one, with its own
    triton), every recorded launch then hits it, kernel and launcher; a kernel taken out
    is a miss, named; installed elsewhere, its groups point at their new place."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cache, moved = tmp_path / "cache", tmp_path / "moved"

    def run(*args):
        return subprocess.run([sys.executable, "-W", "ignore", "-m", "benchmarks.gpu.cache", *args],
                              capture_output=True, text=True, env=env, cwd=repo, timeout=600)
    built = run("build", "--python", sys.executable, "--steps", "vqvae", "--no-tests", "--only",
                "_ema_scalars_kernel", "--out", str(cache), "--jobs", "1")
    assert built.returncode == 0, built.stderr[-3000:]
    manifest = json.loads((cache / "manifest.json").read_text())
    import triton.backends.nvidia.driver as driver  # (newer tritons: one launcher for all)
    launchers = int(hasattr(driver, "make_launcher"))
    assert manifest["kernels"] == 1 and manifest["launchers"] == launchers
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    assert len(list(cache.glob(f"*/__triton_launcher{suffix}"))) == launchers
    assert len(list(cache.glob(f"*/cuda_utils{suffix}"))) == 1
    assert not list(cache.glob("*/*.ttir")) and len(list(cache.glob("*/*.cubin"))) == 1
    checked = run("check", "--cache", str(cache), "--jobs", "1")
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "1 of 1 recorded kernel specialisations hit it" in checked.stdout

    from benchmarks.gpu import cache as C
    manifest = C.install_to(cache, moved)  # (what `install` does, without triton's key)
    group = next(moved.glob("*/__grp__*.json"))
    assert all(Path(p).parent == group.parent and Path(p).exists()
               for p in json.loads(group.read_text())["child_paths"].values())

    next(cache.glob("*/*.cubin")).parent.joinpath("__grp___ema_scalars_kernel.json").unlink()
    missed = run("check", "--cache", str(cache), "--jobs", "1")
    assert missed.returncode == 1 and "_ema_scalars_kernel for VQ-VAE" in missed.stderr
    assert "not in the cache" in missed.stderr
    shutil.rmtree(cache)
    assert run("check", "--cache", str(cache), "--optional").returncode == 0
    assert run("check", "--cache", str(cache)).returncode == 1


def _last_lines(script: str, count: int) -> list:
    """The last ``count`` lines ``script`` prints, run by this Python with triton compiled
    (not interpreted), from the repository's root."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-count:]


@pytest.mark.slow
def test_bench_part_launches_are_recorded_from_its_own_code():
    """``benchmarks.gpu.cache.record_bench``: the bench part's vqfast cases at its shapes
    (both dtypes, the nearest-code op and the EMA step, relaxed and acq_rel statistics
    atomics), each run once on CPU stand-ins with its launches bound as a GPU's JIT would."""
    kernels, constants, x_types = _last_lines(
        "from benchmarks.gpu.cache import record_bench\n"
        "specs = record_bench()\n"
        "print(sorted({s['kernel'] for s in specs}))\n"
        "print(sorted({str(v) for s in specs for v in s['constants'].values()}))\n"
        "print(sorted({s['signature'].get('x_ptr', '') for s in specs}))\n", 3)
    for kernel in ("_nearest_code_kernel", "_gather_loss_kernel", "_ema_finalize_kernel",
                   "_quantize_backward_kernel"):
        assert kernel in kernels
    assert "acq_rel" in constants and "relaxed" in constants
    assert "*bf16" in x_types and "*fp32" in x_types


def test_harvest_brings_back_only_what_the_carried_cache_lacks_and_merges(tmp_path, monkeypatch):
    """``benchmarks.gpu.cache harvest`` (GPU machine): the run's cache entries that the
    carried cache lacks, intermediate IRs dropped; ``merge`` (back on the CPU machine) adds
    them, paths pointing at their new place, and refuses another triton build's."""
    import argparse
    import json
    from pathlib import Path
    from benchmarks.gpu import cache as C
    monkeypatch.setattr(C, "_triton_key_sha256", lambda: "k" * 64)

    def entry(root, name, files):
        folder = root / name
        folder.mkdir(parents=True)
        for f in files:
            (folder / f).write_text(f)
        group = {f: str(folder / f) for f in files}
        (folder / "__grp__k.json").write_text(json.dumps({"child_paths": group}))
    carried, run = tmp_path / "carried", tmp_path / "run"
    entry(carried, "OLD", ["k.json", "k.cubin"])
    (carried / "manifest.json").write_text(json.dumps({"triton_key_sha256": "k" * 64}))
    entry(run, "OLD", ["k.json", "k.cubin"])
    entry(run, "NEW", ["k.json", "k.cubin", "k.ttir", "k.llir"])
    tarball = tmp_path / "new.tar.gz"
    assert C.harvest(argparse.Namespace(cache_dir=str(run), carried=str(carried),
                                        tarball=str(tarball))) == 0
    assert C.merge(argparse.Namespace(tarball=str(tarball), cache=str(carried))) == 0
    assert sorted(p.name for p in (carried / "NEW").iterdir()) == ["__grp__k.json", "k.cubin",
                                                                     "k.json"]
    group = json.loads((carried / "NEW" / "__grp__k.json").read_text())["child_paths"]
    assert all(Path(p).parent == carried / "NEW" and Path(p).exists() for p in group.values())
    assert json.loads((carried / "manifest.json").read_text())["harvested"] == 1
    monkeypatch.setattr(C, "_triton_key_sha256", lambda: "x" * 64)
    C.harvest(argparse.Namespace(cache_dir=str(run), carried=str(tmp_path / "none"),
                                 tarball=str(tarball)))
    with pytest.raises(SystemExit, match="another triton build"):
        C.merge(argparse.Namespace(tarball=str(tarball), cache=str(carried)))


@pytest.mark.slow
def test_family_part_launches_are_recorded_from_its_own_code():
    """``benchmarks.gpu.cache.record_family``: vqfast's own family benchmarks at the cases
    they take on CUDA (IBQ's CUDA cases, encode in bf16 too, residual VQ in tf32 too), with
    ``auto`` resolving to Triton as for CUDA tensors, and only while recording."""
    kernels, constants, auto = _last_lines(
        "import torch\n"
        "from benchmarks.gpu.cache import record_family\n"
        "from vqfast.ops import dispatch\n"
        "specs = record_family()\n"
        "print(sorted({s['kernel'] for s in specs}))\n"
        "print(sorted({str(v) for s in specs for v in s['constants'].values()}))\n"
        "print(dispatch.resolve_backend('auto', torch.device('cpu')))\n", 3)
    for kernel in ("_residual_forward_kernel", "_residual_backward_kernel", "_ibq_forward_kernel",
                   "_lfq_quantize_kernel", "_residual_fsq_backward_kernel", "_nearest_code_kernel",
                   "_fsq_forward_kernel"):  # (the plain LFQ / BSQ / FSQ benchmark's)
        assert kernel in kernels
    import ast
    assert "tf32" in ast.literal_eval(constants)  # (residual VQ's tf32 case, CUDA-only)
    assert auto == "torch"


@pytest.mark.slow
def test_train_and_quality_parts_launches_are_recorded_from_their_own_code():
    """``benchmarks.gpu.cache.record_train``: the train part's VQ-VAE step and each vqfast
    configuration of the quality part (training steps, then the evaluation), run from their
    own code on CPU stand-ins (here at the ``--dry-run`` sizes)."""
    kernels, auto = _last_lines(
        "import torch\n"
        "from benchmarks.gpu.cache import record_train\n"
        "from vqfast.ops import dispatch\n"
        "specs = record_train(dry_run=True)\n"
        "print(sorted({s['kernel'] for s in specs}))\n"
        "print(dispatch.resolve_backend('auto', torch.device('cpu')))\n", 2)
    # the EMA step and its re-seeding, the learned codebook's, the residual configuration's
    for kernel in ("_nearest_code_kernel", "_ema_finalize_kernel", "_reseed_codes_kernel",
                   "_residual_forward_kernel", "_residual_backward_kernel"):
        assert kernel in kernels
    assert auto == "torch"
