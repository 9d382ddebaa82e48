"""Predicted GPU time of vqfast's training steps, from the compiled kernels' SASS.

No GPU needed: each step is run once on CPU stand-in tensors with its Triton launches
recorded (``benchmarks.host.StubbedLaunches``: the specialisation triton's JIT would build,
the grid, the arguments); each specialisation is compiled for sm_90 and its SASS read
(``cuobjdump`` from the triton wheel): the loops (backward branches), and per loop the
instructions a warp issues, the tensor-core instructions (``HGMMA.MxNxK``) and the bytes it
loads, stores and reduces. With each loop's trip count from the launch's arguments, a kernel's
time on one GPU is

    launch gap + max(HBM bytes / HBM bandwidth,
                     waves x the time of one SM's resident programs)

where a program's time is per loop iteration the largest of: its tensor-core cycles, its
issue cycles (instructions x warps / 4 schedulers) and its L2 bytes / the SM's share of L2
bandwidth; and, when one program fills an SM (no second one to overlap with), the
instructions outside the tensor-core loop (the argmin epilogue) are added after it rather
than hidden under it. Every figure is a prediction: ``PREDICTION.md`` lists each with the
measurement that would falsify it.

    python -m benchmarks.gpu.model                       # the table, H100 and H200
    python -m benchmarks.gpu.model --out benchmarks/results
"""

import argparse
import collections
import dataclasses
import importlib
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import vqfast
from vqfast.kernels._launch import cdiv

# --- the GPUs ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Gpu:
    """What the model assumes of a GPU (sm_90). Sources: NVIDIA's H100/H200 datasheets
    (SMs, HBM); the tensor-core rate per SM per cycle from the dense peak over SMs x boost
    clock; the sustained clock under tensor load and L2 bandwidth are assumptions
    (Chips and Cheese measured ~5.5 TB/s of L2 on an H100 PCIe, 114 SMs: scaled to 132)."""
    name: str
    sms: int = 132
    clock_ghz: float = 1.755  # sustained under tensor-core load (boost: 1.98)
    hbm_tb_s: float = 3.35
    hbm_efficiency: float = 0.85  # of the datasheet's peak, for streaming kernels
    l2_tb_s: float = 6.4
    flop_per_cycle_sm: tuple = (("BF16", 4096), ("F16", 4096), ("TF32", 2048))
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    max_warps_per_sm: int = 64
    launch_gap_us: float = 2.5  # back-to-back kernels on one stream, device side


GPUS = (Gpu("H100 SXM"), Gpu("H200", hbm_tb_s=4.8))

# --- the steps -----------------------------------------------------------------------------

LARGE = (64, 256, 32, 32)  # N = 65536 vectors of D = 256, K = 16384 codes
VQVAE = (256, 64, 8, 8)  # N = 16384, D = 64, K = 512 (the CIFAR-10 VQ-VAE's quantizer)
STEPS = [  # (name, module builder, input shape, dtype)
    ("VQ-VAE EMA bf16", lambda: vqfast.VectorQuantizerEMA(512, 64, backend="triton"), VQVAE,
     torch.bfloat16),
    ("VQ-VAE EMA fp32", lambda: vqfast.VectorQuantizerEMA(512, 64, backend="triton"), VQVAE,
     torch.float32),
    ("VQ-VAE learned bf16", lambda: vqfast.VectorQuantizer(512, 64, backend="triton"), VQVAE,
     torch.bfloat16),
    ("large EMA bf16", lambda: vqfast.VectorQuantizerEMA(16384, 256, backend="triton"), LARGE,
     torch.bfloat16),
    ("large EMA tf32x3", lambda: vqfast.VectorQuantizerEMA(
        16384, 256, backend="triton", precision="tf32x3"), LARGE, torch.float32),
    ("large EMA tf32", lambda: vqfast.VectorQuantizerEMA(
        16384, 256, backend="triton", precision="tf32"), LARGE, torch.float32),
    ("large EMA fp32 ieee", lambda: vqfast.VectorQuantizerEMA(
        16384, 256, backend="triton", precision="ieee"), LARGE, torch.float32),
]
# The targets the project set for the search's shape (predicted, H100, the EMA step).
TARGETS_MS = {"large EMA bf16": 1.2, "large EMA tf32x3": 5.0, "large EMA fp32 ieee": 13.0,
              "VQ-VAE EMA bf16": 0.05}


def record_launches(steps=STEPS):
    """``{step: [launch]}``, each launch a dict: kernel, its module, triton's specialisation
    (as ``benchmarks.host.record_specializations`` records it), the grid, and its named
    arguments (ints and floats as they are; tensors as ``(shape, dtype, bytes, address)``)
    of a trained step (after the first, k-means, step); plus ``"other ops"``, the step's
    non-Triton compute ops (each a CUDA kernel)."""
    from benchmarks.host import StubbedLaunches, recorded_steps
    launches = StubbedLaunches(record=True)
    out = {}
    for name, _, trained, ops in recorded_steps(steps, launches, count_ops=True):
        step = []
        for kernel, key, grid, args in launches.launch_log[trained:]:
            spec = launches.recorded[kernel, key]
            fn = getattr(importlib.import_module(spec["module"]), kernel)
            step.append(dict(kernel=kernel, spec=spec, grid=tuple(grid),
                             args=dict(zip(fn.arg_names, args)), consts=spec["constants"]))
        out[name] = dict(launches=step, other_ops=sum(ops.values()))
    return out


# --- the SASS ------------------------------------------------------------------------------

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][\w.]*)([^;]*);")
_HGMMA = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)\.F32(?:\.(\w+))?")
_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def _bytes_per_thread(opcode: str) -> int:
    return next((_WIDTH[p] for p in opcode.split(".")[1:] if p in _WIDTH), 4)


@dataclasses.dataclass
class Block:
    """What one warp issues in one pass over a loop nest level (or straight-line code)."""
    instructions: int = 0
    mma_flops: dict = dataclasses.field(default_factory=collections.Counter)  # per warpgroup
    load_bytes: int = 0  # global -> registers/shared, per warp
    store_bytes: int = 0
    atomics: int = 0  # warp instructions (RED/ATOMG)
    async_copies: int = 0  # LDGSTS (cp.async): the loop is software-pipelined
    cached_load_bytes: int = 0  # plain LDG in such a loop: vectors every warp reads (L1)
    mma_waited: bool = False  # a wait for all tensor-core work follows the MMAs here


def parse_sass(text: str):
    """``(loops, blocks)``: ``loops`` the ``(start, end)`` addresses of each loop (a branch
    back to an earlier address), in address order; ``blocks`` maps each loop nest (a tuple
    of loop indices, outermost first; ``()`` outside every loop) to its ``Block``."""
    instructions = [(int(a, 16), op, rest) for a, _, op, rest in _LINE.findall(text)]
    loops = sorted({(int(m.group(1), 16), addr) for addr, op, rest in instructions
                    if op == "BRA" and (m := re.match(r"\s*(?:`\()?(0x[0-9a-f]+)", rest))
                    and int(m.group(1), 16) < addr})
    blocks = collections.defaultdict(Block)
    for addr, op, rest in instructions:
        if op in ("NOP", "EXIT") or (op == "BRA" and re.match(rf"\s*(?:`\()?{addr:#x}\b", rest)):
            continue  # (a branch to itself: the padding after the kernel's exit)
        nest = tuple(i for i, (s, e) in enumerate(loops) if s <= addr <= e)
        block = blocks[nest]
        block.instructions += 1
        if op == "WARPGROUP.DEPBAR.LE" and rest.strip().endswith("0x0") and block.mma_flops:
            block.mma_waited = True
        if m := _HGMMA.match(op):
            mm, nn, kk, dtype = m.groups()  # (fp16 has no suffix; tf32 is .TF32)
            block.mma_flops[dtype or "F16"] += 2 * int(mm) * int(nn) * int(kk)
        elif op.startswith(("LDGSTS", "LDG")) and op != "LDGDEPBAR":
            if op.startswith("LDGSTS"):
                block.async_copies += 1
                block.load_bytes += 32 * _bytes_per_thread(op)
            else:
                block.cached_load_bytes += 32 * _bytes_per_thread(op)
        elif op.startswith("STG"):
            block.store_bytes += 32 * _bytes_per_thread(op)
        elif op.startswith(("RED.", "ATOMG")):  # (not REDUX, a warp reduction)
            block.atomics += 1
    for block in blocks.values():  # plain loads stream unless cp.async streams the operands
        if not block.async_copies:
            block.load_bytes, block.cached_load_bytes = block.cached_load_bytes + block.load_bytes, 0
    return loops, dict(blocks)



def trip_counts(kernel: str, loops: list, args: dict, consts: dict) -> list:
    """How many times each loop runs (address order), from the launch's arguments: the
    search's loops are ``|x|^2`` over channels, the code tiles, the channels of a tile; every
    other vqfast kernel's loops walk the channels in ``BLOCK_D`` chunks (an assumption:
    ``benchmarks/gpu/PREDICTION.md`` names what would falsify it). A search whose SASS has
    another number of loops than its rule names is an error, not a guess."""
    d = args.get("D") or args.get("d")
    channels = cdiv(d, consts["BLOCK_D"]) if "BLOCK_D" in consts and d else 1
    if kernel == "_nearest_code_kernel" and consts.get("RESIDENT"):  # first code tile peeled
        rule = [cdiv(args["K"], consts["BLOCK_K"]) - 1]
    elif kernel == "_nearest_code_kernel":
        rule = [channels, cdiv(args["K"], consts["BLOCK_K"]), channels]
    else:
        rule = [channels] * len(loops)
    if len(rule) != len(loops):
        raise ValueError(f"{kernel}: {len(loops)} loops in its SASS, the model's rule has {len(rule)}")
    return rule


# --- compile -------------------------------------------------------------------------------

def _tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_spec(spec: dict) -> dict:
    """The specialisation compiled for sm_90: SASS text, registers, shared memory, warps."""
    from triton.backends.compiler import GPUTarget
    from benchmarks.host import compile_recorded
    compiled = compile_recorded(spec, GPUTarget("cuda", 90, 32))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
    return {"sass": sass, "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "shared": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
            "num_stages": compiled.metadata.num_stages}


# --- time ----------------------------------------------------------------------------------

def programs_per_sm(gpu: Gpu, registers: int, shared: int, warps: int) -> int:
    regs = cdiv(max(registers, 1), 8) * 8 * 32 * warps  # allocated per warp in units of 8
    return max(1, min(gpu.regs_per_sm // regs, gpu.smem_per_sm // max(shared + 1024, 1),
                      gpu.max_warps_per_sm // warps, 32))


def kernel_time(gpu: Gpu, launch: dict, build: dict) -> dict:
    """Predicted µs of one launch on ``gpu`` and what bounds it."""
    loops, blocks = parse_sass(build["sass"])
    trips = trip_counts(launch["kernel"], loops, launch["args"], launch["consts"])
    warps = build["num_warps"]
    clock = gpu.clock_ghz * 1e3  # cycles per µs
    rate = dict(gpu.flop_per_cycle_sm)
    l2_rate = gpu.l2_tb_s * 1e6 / gpu.sms / clock  # bytes per cycle per SM
    phases = []  # (tensor-core, issue, L2) cycles of each loop nest level, per program
    for nest, block in blocks.items():
        runs = math.prod(trips[i] for i in nest)
        # a software-pipelined loop runs every iteration, but its prologue (in the
        # enclosing level) issued the loads of the first (stages - 1)
        load_runs = runs
        if nest and block.async_copies and build["num_stages"] > 1:
            load_runs = math.prod(trips[i] for i in nest[:-1]) * max(
                trips[nest[-1]] - (build["num_stages"] - 1), 0)
        mma_cycles = sum(f * (warps // 4) / rate[t] for t, f in block.mma_flops.items()) * runs
        issue_cycles = block.instructions * warps / 4 * runs
        l2_cycles = (block.load_bytes * load_runs + (block.store_bytes + 32 * block.atomics) * runs
                     ) * warps / l2_rate
        # A program's phases run one after another, each at its bound; where what follows
        # the MMAs waits for them (no MMA in flight across the argmin), MMA and issue add up.
        chain = (max(mma_cycles + issue_cycles, l2_cycles) if block.mma_waited
                 else max(mma_cycles, issue_cycles, l2_cycles))
        phases.append((mma_cycles, issue_cycles, l2_cycles, chain))
    mma, issue, l2_cycles, chain = (sum(p[i] for p in phases) for i in range(4))
    per_sm = programs_per_sm(gpu, build["registers"], build["shared"], warps)
    programs = max(math.prod(launch["grid"]), 1)
    waves = cdiv(programs, gpu.sms * per_sm)
    resident = min(per_sm, cdiv(programs, gpu.sms))
    # the programs resident on an SM overlap: one program's chain, or the SM's busiest
    # resource over all of them, whichever is longer
    sm_cycles = max(chain, resident * mma, resident * issue, resident * l2_cycles) * waves
    serial = sum(p[3] for p in phases if not p[0]) if mma else 0.0
    hbm_bytes = sum({a[3]: a[2] for a in launch["args"].values()
                     if isinstance(a, tuple) and len(a) == 4}.values())
    hbm_us = hbm_bytes / (gpu.hbm_tb_s * gpu.hbm_efficiency * 1e6)
    sm_us = sm_cycles / clock
    bound = max((("MMA + argmin in series", chain / resident if mma else 0.0),
                 ("tensor cores", mma), ("issue", issue), ("L2", l2_cycles)),
                key=lambda t: t[1])[0] if sm_us >= hbm_us else "HBM"
    name = launch["kernel"].strip("_").removesuffix("_kernel")
    return {"kernel": name + (" (x-resident)" if launch["consts"].get("RESIDENT") else ""),
            "grid": programs,
            "registers": build["registers"], "programs_per_sm": per_sm, "waves": waves,
            "stages": build["num_stages"], "us": gpu.launch_gap_us + max(hbm_us, sm_us),
            "bound": bound, "hbm_mb": hbm_bytes / 2**20,
            "mma_share": mma * resident * waves / max(sm_cycles, 1),
            "serial_share": serial / max(chain, 1)}


def predict(records: dict, builds: dict, gpus=GPUS) -> list:
    rows = []
    for step, record in records.items():
        for gpu in gpus:
            kernels = [kernel_time(gpu, launch, builds[_build_key(launch)])
                       for launch in record["launches"]]
            total = sum(k["us"] for k in kernels) + record["other_ops"] * gpu.launch_gap_us
            rows.append({"step": step, "gpu": gpu.name, "us": total, "kernels": kernels,
                         "other_ops": record["other_ops"], "target_ms": TARGETS_MS.get(step)})
    return rows


def _build_key(launch: dict) -> str:
    return json.dumps([launch["kernel"], launch["spec"]["signature"],
                       repr(launch["spec"]["constexprs"]), repr(launch["spec"]["attrs"]),
                       launch["spec"]["options"]], sort_keys=True, default=str)


def build_all(records: dict) -> dict:
    from concurrent.futures import ProcessPoolExecutor
    unique = {}
    for record in records.values():
        for launch in record["launches"]:
            unique.setdefault(_build_key(launch), launch["spec"])
    with ProcessPoolExecutor() as pool:
        return dict(zip(unique, pool.map(compile_spec, unique.values())))


def markdown(rows: list, env: dict) -> str:
    lines = [f"Predicted device time of one training step (forward, backward, codebook "
             f"update), from the sm_90 SASS of the specialisations triton {env['triton']} "
             f"builds (`python -m benchmarks.gpu.model`, {env['date']}). Not measured.", "",
             "| step | GPU | predicted µs | target | kernels: µs (bound, programs/SM x waves) |",
             "|---|---|---:|---|---|"]
    for r in rows:
        target = "" if r["target_ms"] is None or r["gpu"] != GPUS[0].name else (
            f"≤ {r['target_ms'] * 1e3:.0f} µs: {'met' if r['us'] <= r['target_ms'] * 1e3 else 'missed'}")
        parts = ", ".join(f"{k['kernel']} {k['us']:.0f} ({k['bound']}, {k['programs_per_sm']}x{k['waves']})"
                          for k in r["kernels"])
        if r["other_ops"]:
            parts += f", {r['other_ops']} other ops"
        lines.append(f"| {r['step']} | {r['gpu']} | {r['us']:.0f} | {target} | {parts} |")
    return "\n".join(lines) + "\n"


# What to measure if the model is wrong, by what bounds the step's slowest kernel
# (Nsight Compute metrics; the GPU command's bench.json gives the step time itself).
FALSIFIERS = {
    "L2": "the search's L2 throughput (ncu lts__t_bytes.sum.per_second) well below "
          "6.4 TB/s while the step is slower: the L2 figure is high; above it and faster: low",
    "tensor cores": "tensor pipe busy (ncu sm__pipe_tensor_op_hgmma_cycles_active) well "
                    "below 90% in the search",
    "MMA + argmin in series": "tensor pipe busy above 70% in the search (then the argmin "
                              "overlaps the MMAs after all)",
    "issue": "issue slots busy (ncu sm__inst_issued.avg.pct_of_peak_sustained_active) "
             "well below 80% in the search",
    "HBM": "DRAM throughput (ncu dram__bytes.sum.per_second) well below 2.8 TB/s",
}
MAIN_FIGURES = {"large-ema-bf16-ms": "large EMA bf16", "large-ema-fp32-ms": "large EMA fp32 ieee"}
SECTION = "## The model's table"


def prediction_section(rows: list, env: dict) -> str:
    """PREDICTION.md's section for the model: each step's figure with its falsifier."""
    lines = [SECTION, "",
             f"Written by `python -m benchmarks.gpu.model --prediction "
             f"benchmarks/gpu/PREDICTION.md` ({env['date']}, triton {env['triton']}, sm_90 "
             f"SASS; its docstring says how). Device time only: an eager step adds the host's "
             f"(`python -m benchmarks.host`). Each figure is falsified by a step measured below "
             f"2/3 or above 3/2 of it, or by its bound's own measurement. The main figures "
             f"large-ema-bf16-ms and large-ema-fp32-ms come from this table (first written "
             f"2026-12-06; estimated by hand before: 1.05 and 16 ms).", "",
             "| step | GPU | predicted µs | slowest kernel: bound | falsified if |", "|---|---|---:|---|---|"]
    for r in rows:
        slowest = max(r["kernels"], key=lambda k: k["us"])
        lines.append(f"| {r['step']} | {r['gpu']} | {r['us']:.0f} | {slowest['kernel']}: "
                     f"{slowest['bound']} | outside {r['us'] / 1.5:.0f}-{r['us'] * 1.5:.0f} µs; "
                     f"{FALSIFIERS[slowest['bound']]} |")
    return "\n".join(lines) + "\n"


def write_prediction(path: Path, rows: list, env: dict) -> None:
    """Replace the model's section of ``path`` (added before "Main figures" if absent) and
    the main figures it predicts (H100)."""
    text = path.read_text()
    section = prediction_section(rows, env)
    if SECTION in text:
        start = text.index(SECTION)
        end = text.find("\n## ", start + 1) + 1 or len(text)
        text = text[:start] + section + ("\n" + text[end:] if end < len(text) else "")
    elif "## Main figures" in text:
        text = text.replace("## Main figures", section + "\n## Main figures")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    h100 = {r["step"]: r["us"] for r in rows if r["gpu"] == GPUS[0].name}
    for figure, step in MAIN_FIGURES.items():
        if step in h100:
            text = re.sub(rf"^(\| {re.escape(figure)} \|[^|]*\| )[^|]*( \|)",
                          rf"\g<1>{h100[step] / 1e3:.3g}\g<2>", text, flags=re.M)
    path.write_text(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write <date>-model.json and .md here")
    parser.add_argument("--step", action="append", help="only this step (repeatable)")
    parser.add_argument("--prediction", type=Path,
                        help="rewrite this PREDICTION.md's model section and main figures")
    args = parser.parse_args(argv)
    import triton
    steps = [s for s in STEPS if not args.step or s[0] in args.step]
    records = record_launches(steps)
    builds = build_all(records)
    rows = predict(records, builds)
    env = {"triton": triton.__version__, "date": time.strftime("%Y-%m-%d"), "target": "sm_90"}
    text = markdown(rows, env)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"{env['date']}-model"
        Path(f"{stem}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
        Path(f"{stem}.md").write_text(text)
    if args.prediction:
        write_prediction(args.prediction, rows, env)


if __name__ == "__main__":
    sys.exit(main())
