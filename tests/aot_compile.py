"""Compile every vqfast kernel ahead of time for sm_80 and sm_90, no GPU needed.

For every block configuration its launcher can pick: ``triton.compile`` for each target,
the shared memory it needs against the target's limit, and the ``ptxas`` shipped in the
triton wheel (``-v``) for registers and spill stores. Prints one JSON object per
(variant, target); exits 1 if any compile failed. Run with ``TRITON_INTERPRET`` unset
(``@triton.jit`` must build real JITFunctions): ``tests/test_aot.py`` does so.
"""

import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# importlib: the package re-exports launchers under their modules' names.
code_sums, ema_update, gather_loss, nearest_code, quantize_backward = (
    importlib.import_module(f"vqfast.kernels.{name}")
    for name in ("code_sums", "ema_update", "gather_loss", "nearest_code", "quantize_backward"))

TARGETS = {80: 163 * 1024, 90: 227 * 1024}  # compute capability -> max shared memory per block
PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
launch_config = importlib.import_module("vqfast.kernels._checks").launch_config


def _streaming_configs(config):
    """Every (constexprs, options) the launcher's ``launch_config`` can pick, over all D."""
    seen = {}
    for dim in (1, 17, 33, 65, 129, 4096):
        consts = launch_config(config, dim)
        seen[consts["BLOCK_D"]] = consts
    for consts in seen.values():
        yield consts, {"num_warps": consts.pop("num_warps")}


def variants():
    """(name, kernel, signature, constexprs, options) for every launchable configuration:
    each twice, with a runtime S ([B, D, S] inputs) and with S == 1, which triton's JIT
    specialises to a constant for [N, D] inputs."""
    for name, kernel, sig, consts, options in _variants():
        yield name + "[S]", kernel, sig, consts, options
        if "S" in sig:
            yield name + "[S=1]", kernel, sig, dict(consts, S=1), options


def _variants():
    torch_dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for dtype in PTR:
        for precision in (nearest_code.PRECISIONS if dtype == "fp32" else ("ieee",)):
            config = nearest_code.pick_config(torch_dtypes[dtype], precision)
            options = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
            sig = {"x_ptr": PTR[dtype], "codebook_ptr": PTR[dtype], "codebook_sqnorm_ptr": "*fp32",
                   "idx_ptr": "*i64", "sqdist_ptr": "*fp32", "N": "i32", "K": "i32", "D": "i32", "S": "i32"}
            consts = dict(config, INPUT_PRECISION=precision, UPCAST_DOT=False)
            yield (f"nearest_code[{dtype},{precision}]", nearest_code._nearest_code_kernel,
                   sig, consts, options)

    for dtype, (cfg, options), atomic in itertools.product(
            PTR, list(_streaming_configs(gather_loss.CONFIG)), (True, False)):
        sig = {"x_ptr": PTR[dtype], "codebook_ptr": "*fp32", "idx_ptr": "*i64", "q_ptr": PTR[dtype],
               "partial_err_ptr": "*fp32", "counts_ptr": "*i32",
               "code_sums_ptr": "*fp32" if atomic else "*i32", "N": "i32", "D": "i32", "S": "i32"}
        yield (f"gather_loss[{dtype},D{cfg['BLOCK_D']},atomic={atomic}]",
               gather_loss._gather_loss_kernel, sig, dict(cfg, ATOMIC_CODE_SUMS=atomic), options)

    for dtype, (cfg, options), has_q in itertools.product(
            PTR, list(_streaming_configs(code_sums.CONFIG)), (True, False)):
        sig = {"x_ptr": PTR[dtype], "q_ptr": PTR[dtype], "order_ptr": "*i64", "offsets_ptr": "*i64",
               "scale_ptr": "*fp32", "out_ptr": "*fp32", "D": "i32", "S": "i32"}
        yield (f"code_sums_sorted[{dtype},D{cfg['BLOCK_D']},q={has_q}]",
               code_sums._code_sums_sorted_kernel, sig, dict(cfg, HAS_Q=has_q, HAS_SCALE=has_q),
               options)

    for cfg, options in _streaming_configs(ema_update.CONFIG):
        sig = {"counts_ptr": "*i32", "code_sums_ptr": "*fp32", "total_ptr": "*fp32",
               "apply_ptr": "*i32", "size_ptr": "*fp32", "weight_ptr": "*fp32", "codebook_ptr": "*fp32",
               "K": "i32", "D": "i32", "decay": "fp32", "epsilon": "fp32"}
        yield f"ema_finalize[D{cfg['BLOCK_D']}]", ema_update._ema_finalize_kernel, sig, cfg, options

    for dtype, (cfg, options), atomic in itertools.product(
            PTR, list(_streaming_configs(quantize_backward.CONFIG)), (True, False)):
        sig = {"grad_q_ptr": PTR[dtype], "x_ptr": PTR[dtype], "q_ptr": PTR[dtype], "idx_ptr": "*i64",
               "grad_loss_ptr": "*fp32", "grad_x_ptr": PTR[dtype],
               "grad_codebook_ptr": "*fp32" if atomic else PTR[dtype], "N": "i32", "D": "i32",
               "S": "i32", "x_scale": "fp32", "codebook_scale": "fp32"}
        yield (f"quantize_backward[{dtype},D{cfg['BLOCK_D']},atomic={atomic}]",
               quantize_backward._quantize_backward_kernel, sig,
               dict(cfg, ATOMIC_CODEBOOK_GRAD=atomic), options)


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


def compile_one(job):
    index, capability = job
    name, kernel, sig, consts, options = list(variants())[index]
    record = {"name": name, "target": f"sm_{capability}"}
    try:
        src = ASTSource(fn=kernel, signature={**sig, **{k: "constexpr" for k in consts}},
                        constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
        ptx = compiled.asm["ptx"]
        record.update(shared=compiled.metadata.shared, shared_limit=TARGETS[capability],
                      mma="mma.sync" in ptx, wgmma="wgmma" in ptx, **_ptxas(ptx, capability))
    except Exception as error:  # report every failure, not just the first
        record["error"] = f"{type(error).__name__}: {error}"[:2000]
    return record


def main():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: AOT compilation needs real JITFunctions")
    jobs = [(i, cap) for i in range(len(list(variants()))) for cap in TARGETS]
    failed = False
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for record in pool.map(compile_one, jobs):
            failed |= "error" in record
            print(json.dumps(record), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
