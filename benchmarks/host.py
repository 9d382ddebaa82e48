"""Host cost of one eager training step: what Python, autograd and dispatch cost per step,
and how many GPU kernels the step issues.

At small shapes a GPU finishes a quantizer's kernels in tens of microseconds, so an eager
step costs what the host spends issuing it. This benchmark measures that on the CPU: every
Triton launch is replaced by the work triton does on a cache hit (its argument binder,
specialisation and cache key: what each launch costs the host once the kernel is
compiled), tensors are tiny CPU stand-ins, and each step's thread CPU time is taken
(median over ``--steps``, taken in interleaved rounds). The torch-only implementations (the original algorithm,
vector-quantize-pytorch) run their real torch ops on the same tiny tensors.

``kernels`` counts what a GPU would run per step: the Triton launches plus every other
aten compute op (allocations, views and metadata ops are free). The step is forward,
backward and codebook update: ``out = vq(x)``, then ``torch.autograd.backward`` of the
loss and the quantized output with preallocated gradients (so the benchmark's own glue
adds no ops).

    python -m benchmarks.host --out benchmarks/results
"""

import argparse
import collections
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# The real @triton.jit functions (their binders), not the interpreter's.
if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("benchmarks.host needs TRITON_INTERPRET unset (it stubs compiled launches)")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import vqfast  # noqa: E402
from vqfast import reference  # noqa: E402

from vqfast.kernels import _launch, _plan  # noqa: E402
from vqfast.ops import step_plans  # noqa: E402

from .gpu.specializations import describe, import_kernel_module, jit_kwargs, sm90  # noqa: E402
from .measure import save_report  # noqa: E402

# Ops that launch nothing on a GPU: allocation, views, metadata.
FREE_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
            "alias", "lift_fresh", "_unsafe_view", "view", "as_strided", "t", "expand",
            "unsqueeze", "squeeze", "permute", "transpose", "slice", "select", "reshape",
            "_reshape_alias", "movedim", "unbind", "split", "split_with_sizes", "chunk",
            "narrow", "view_as", "_to_copy_noop", "set_", "resize_", "is_same_size",
            "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
            "_has_compatible_shallow_copy_type", "record_stream"}


class StubbedLaunches:
    """Every Triton launch replaced by the work triton does on a cache hit (``JITFunction.run``
    up to the launch: its keyword options, the argument binder and specialisation, the
    cache key and lookup), counted per kernel; tensors stay on the CPU.

    ``recorded``: each distinct specialisation the launches bound, as triton's JIT would
    compile it (``_pack_args``: signature, constexprs, attributes such as divisibility by 16,
    and the launch options), for the ahead-of-time compile of exactly what a GPU builds."""

    def __init__(self, record: bool = False):
        self.count = collections.Counter()
        self.record = record
        self.recorded = {}  # (kernel, triton's cache key) -> what the JIT would compile
        # (kernel, key, grid, arguments described) of every launch, when recording
        self.launch_log = []
        self.excluded_ns = 0  # the stubs' own bookkeeping, not part of the host cost
        self._states = {}  # kernel -> (compiled stand-ins, triton's key cache, binder)

    @contextlib.contextmanager
    def stubbed(self):
        from triton.runtime import jit
        from vqfast.ops import dispatch
        backend = sm90()
        launches = self

        def run(fn, *args, grid, warmup, **kwargs):
            kwargs = jit_kwargs(fn, kwargs)
            state = launches._states.get(fn)  # (this instance's: its counts, its records)
            if state is None:
                state = launches._states[fn] = (
                    {}, {}, jit.create_function_from_signature(fn.signature, fn.params, backend))
            kernel_cache, key_cache, binder = state
            bound_args, specialization, options = binder(*args, **kwargs)
            key = jit.compute_cache_key(key_cache, specialization, options)
            compiled = kernel_cache.get(key)
            if compiled is None:  # triton would compile here
                compiled = kernel_cache[key] = _Compiled(launches, fn.__name__, key)
                if launches.record:
                    launches.recorded[fn.__name__, key] = describe(
                        fn, backend, kwargs, bound_args, specialization, options)
            if not warmup:
                if callable(grid):
                    grid = grid(bound_args)
                grid = (*grid, 1, 1)
                compiled.run(*grid[:3], 0, None, None, None, None, None, *bound_args.values())
            return compiled

        saved = (jit.JITFunction.run, dispatch._triton_interpreted, _launch.interpreted,
                 _launch._current_device, _launch._current_stream)
        jit.JITFunction.run = run
        _launch.forget_fast_launches()
        dispatch._triton_interpreted = lambda: True  # backend="triton" on CPU stand-ins
        _launch.interpreted = lambda device: False  # ... launched as on a GPU
        # (vqfast's own launch path asks the CUDA driver for these: C calls)
        _launch._current_device = lambda: 0
        _launch._current_stream = lambda device: 0
        try:
            yield self
        finally:
            (jit.JITFunction.run, dispatch._triton_interpreted, _launch.interpreted,
             _launch._current_device, _launch._current_stream) = saved
            _launch.forget_fast_launches()  # their launches were stubs

    def launched(self, name, key, args, grid=(1, 1, 1)) -> None:
        """A stubbed launch of kernel ``name`` (triton's cache key ``key``)."""
        if self.record:  # (described, not kept: a step's tensors are freed as on a GPU)
            self.launch_log.append((name, key, grid, tuple(_describe(a) for a in args)))
        self.count[name] += 1
        start = time.thread_time_ns()
        for arg in args:  # valid codes and counts for the torch ops that follow (0s)
            if isinstance(arg, torch.Tensor) and arg.dtype in (torch.int32, torch.int64):
                arg.detach().numpy().fill(0)
        self.excluded_ns += time.thread_time_ns() - start


def recorded_source(spec: dict):
    """A specialisation ``StubbedLaunches`` recorded, as the ``ASTSource`` triton's JIT
    builds for it."""
    from triton.compiler import ASTSource
    kernel = getattr(import_kernel_module(spec["module"]), spec["kernel"])
    return ASTSource(kernel, spec["signature"], spec["constexprs"], spec["attrs"])


def compile_recorded(spec: dict, target, source=None):
    """``spec`` compiled for ``target`` as triton's JIT compiles it (its source, its launch
    options parsed by the target's backend), from ``source`` if given (``recorded_source``'s,
    altered)."""
    import triton
    from triton.compiler import make_backend
    options = make_backend(target).parse_options(spec["options"]).__dict__
    return triton.compile(source or recorded_source(spec), target=target, options=options)


def _describe(arg):
    """A launch argument as ``benchmarks.gpu.model`` reads it: a tensor as ``(shape, dtype,
    bytes, address)``, anything else as it is."""
    if isinstance(arg, torch.Tensor):
        return tuple(arg.shape), str(arg.dtype), arg.numel() * arg.element_size(), arg.data_ptr()
    return arg


class _Compiled:
    """A compiled kernel's stand-in: what ``launch`` and triton call on the host (its
    launcher ``run``, the handles), launching nothing."""

    function = packed_metadata = None

    def __init__(self, launches, name, key):
        self.launches, self.name, self.key = launches, name, key

    def _init_handles(self):
        pass

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, grid_0, grid_1, grid_2, stream, function, metadata, launch_metadata, enter,
            leave, *args):
        self.launches.launched(self.name, self.key, args, (grid_0, grid_1, grid_2))


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__.rstrip("_") if func.overloadpacket.__name__ != "set_" \
            else "set_"
        if not func.is_view and name not in FREE_OPS and func.overloadpacket.__name__ not in FREE_OPS:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


# --- the cases -----------------------------------------------------------------------------

B, H, W, D, K = 2, 4, 4, 64, 512  # tiny stand-ins: N = 32 vectors, the VQ-VAE's D and K


def _vqp_ema():
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        return None
    return VectorQuantize(dim=D, codebook_size=K, decay=0.99, eps=1e-5, commitment_weight=0.25,
                          kmeans_init=False, accept_image_fmap=True, rotation_trick=False)


class _PlainTorch(torch.nn.Module):
    """A family's algorithm in plain torch (its oracle in ``vqfast.reference``, with the
    parameters the vqfast module trains) as a training step's module: channels-first
    ``[B, C, H, W]`` in, ``(loss, quantized)`` out; an EMA codebook's update by the
    original's formulas (`reference.ema_step`) from the oracle's statistics."""

    def __init__(self, step, **state):
        super().__init__()
        self.step = step
        for name, value in state.items():
            if isinstance(value, torch.nn.Module):
                self.add_module(name, value)
            elif isinstance(value, torch.nn.Parameter):
                self.register_parameter(name, value)
            else:
                self.register_buffer(name, value)

    def forward(self, x):
        return self.step(self, x)


def _rows(x):
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _image(rows, like):
    return rows.view(like.shape[0], *like.shape[2:], like.shape[1]).permute(0, 3, 1, 2)


def _ema(m, counts, code_sums, decay=0.99, epsilon=1e-5):
    """The original's EMA update (`reference.ema_step`), of every codebook at once."""
    with torch.no_grad():
        size = m.size * decay + (1 - decay) * counts
        n = size.sum(-1, keepdim=True)
        m.size.copy_((size + epsilon) / (n + K * epsilon) * n)
        m.weight.copy_(m.weight * decay + (1 - decay) * code_sums)
        m.codebook.copy_(m.weight / m.size[..., None])


def _vqp_residual(levels):
    """vector-quantize-pytorch's ``ResidualVQ`` (EMA codebooks, no k-means, no re-seeding):
    the residual family's plain torch (its oracle builds per-level statistics for tests)."""
    try:
        from vector_quantize_pytorch import ResidualVQ
    except ImportError:
        return None
    rvq = ResidualVQ(dim=D, num_quantizers=levels, codebook_size=K, decay=0.99, eps=1e-5,
                     commitment_weight=0.25, kmeans_init=False)

    def step(m, x):  # (tokens [B, H*W, D]: its image path fails on this version's concat)
        tokens = x.flatten(2).transpose(1, 2)
        out, _, losses = m.rvq(tokens)
        return losses.sum(), out.transpose(1, 2).reshape(x.shape)
    return _PlainTorch(step, rvq=rvq)


def _plain_fsq(levels):
    def step(m, x):
        q, _ = reference.fsq(m.project_in(_rows(x)), levels)
        return (_image(m.project_out(q), x),)
    return _PlainTorch(step, project_in=torch.nn.Linear(D, len(levels)),
                       project_out=torch.nn.Linear(len(levels), D))


def _plain_lfq(x):
    loss, q, *_ = reference.lfq(_rows(x))
    return loss, _image(q, x)


def _plain_residual_lfq(levels):
    def step(m, x):
        loss, out, *_ = reference.residual_lfq(_rows(x), levels)
        return loss, _image(out, x)
    return _PlainTorch(step)


def _plain_sim_vq():
    def step(m, x):
        out, loss, _ = reference.simvq(_rows(x), m.basis, m.code_transform.weight)
        return loss, _image(out, x)
    return _PlainTorch(step, basis=torch.randn(K, D) / D ** 0.5,
                       code_transform=torch.nn.Linear(D, D, bias=False))


def _plain_ibq():
    def step(m, x):
        out, loss, _ = reference.ibq(_rows(x), m.codebook)
        return loss, _image(out, x)
    return _PlainTorch(step, codebook=torch.nn.Parameter(torch.randn(K, D)))


def _plain_multiscale(scales):
    fast = vqfast.MultiScaleResidualVQ(K, D, scales=scales)  # its Phi convs, shared as VAR's

    def step(m, x):
        phis = [m.phis[i] for i in fast._phi_of_scale]
        loss, out, codes, rests = reference.multiscale_residual_vq(x, m.codebook, fast.scales,
                                                                   phis)
        with torch.no_grad():  # the statistics of every scale's codes, then one update
            rows, idx = torch.cat(rests), torch.cat([c.reshape(-1) for c in codes])
            counts = torch.bincount(idx, minlength=K)
            sums = torch.zeros(K, D).index_add_(0, idx, rows)
        _ema(m, counts, sums)
        return loss, out
    return _PlainTorch(step, phis=fast.quant_resi, codebook=torch.randn(K, D),
                       size=torch.ones(K), weight=torch.randn(K, D))


# Each vqfast case's algorithm in plain torch (the last column of the table)
PLAIN = {"ResidualVQ (8 levels)": "vector-quantize-pytorch ResidualVQ (8 levels, EMA)",
         "FSQ (8, 5, 5, 5)": "FSQ (8, 5, 5, 5), plain torch",
         "LFQ (d = 10)": "LFQ (d = 10), plain torch",
         "ResidualLFQ (4 levels, d = 10)": "ResidualLFQ (4 levels, d = 10), plain torch",
         "SimVQ": "SimVQ, plain torch",
         "IndexBackpropVQ": "IndexBackpropVQ, plain torch",
         "MultiScaleResidualVQ (scales 1, 2, 4)": "MultiScaleResidualVQ (scales 1, 2, 4), plain torch"}


def _cases():
    """(name, module builder, input shape, implementation kind)."""
    image = (B, D, H, W)
    return [
        ("VectorQuantizerEMA (defaults)", lambda b: vqfast.VectorQuantizerEMA(K, D, backend=b), image, "vqfast"),
        ("VectorQuantizerEMA (defaults), no step plans",
         lambda b: vqfast.VectorQuantizerEMA(K, D, backend=b), image, "vqfast, no step plans"),
        ("VectorQuantizerEMA (defaults), no launch plans",
         lambda b: vqfast.VectorQuantizerEMA(K, D, backend=b), image, "vqfast, no launch plans"),
        ("VectorQuantizerEMA (defaults), every launch through triton's JITFunction.run",
         lambda b: vqfast.VectorQuantizerEMA(K, D, backend=b), image, "vqfast, triton's launch path"),
        ("VectorQuantizer (defaults)", lambda b: vqfast.VectorQuantizer(K, D, backend=b), image, "vqfast"),
        ("VectorQuantizerEMA (original algorithm)",
         lambda b: vqfast.VectorQuantizerEMA(K, D, backend=b, **vqfast.ORIGINAL_ALGORITHM), image, "vqfast"),
        ("ResidualVQ (8 levels)", lambda b: vqfast.ResidualVQ(8, K, D, backend=b), image, "vqfast"),
        ("FSQ (8, 5, 5, 5)", lambda b: vqfast.FSQ([8, 5, 5, 5], dim=D, backend=b), image, "vqfast"),
        ("LFQ (d = 10)", lambda b: vqfast.LFQ(10, backend=b), (B, 10, H, W), "vqfast"),
        ("ResidualLFQ (4 levels, d = 10)", lambda b: vqfast.ResidualLFQ(10, 4, backend=b),
         (B, 10, H, W), "vqfast"),
        ("ResidualFSQ (4 levels of (8, 5, 5, 5))",
         lambda b: vqfast.ResidualFSQ([8, 5, 5, 5], 4, dim=D, backend=b), image, "vqfast"),
        ("SimVQ", lambda b: vqfast.SimVQ(K, D, backend=b), image, "vqfast"),
        ("IndexBackpropVQ", lambda b: vqfast.IndexBackpropVQ(K, D, backend=b), image, "vqfast"),
        ("MultiScaleResidualVQ (scales 1, 2, 4)",
         lambda b: vqfast.MultiScaleResidualVQ(K, D, scales=(1, 2, 4), backend=b), image, "vqfast"),
        ("original EMA (vqfast.reference)", lambda b: reference.VectorQuantizerEMA(K, D, 0.25, 0.99),
         image, "torch"),
        ("original VQ (vqfast.reference)", lambda b: reference.VectorQuantizer(K, D, 0.25), image,
         "torch"),
        ("vector-quantize-pytorch VectorQuantize (EMA)", lambda b: _vqp_ema(), image, "torch"),
        # each family's algorithm in plain torch (its oracle), the vqfast row's baseline
        (PLAIN["ResidualVQ (8 levels)"], lambda b: _vqp_residual(8), image, "torch"),
        (PLAIN["FSQ (8, 5, 5, 5)"], lambda b: _plain_fsq([8, 5, 5, 5]), image, "torch"),
        (PLAIN["LFQ (d = 10)"], lambda b: _PlainTorch(lambda m, x: _plain_lfq(x)),
         (B, 10, H, W), "torch"),
        (PLAIN["ResidualLFQ (4 levels, d = 10)"], lambda b: _plain_residual_lfq(4),
         (B, 10, H, W), "torch"),
        (PLAIN["SimVQ"], lambda b: _plain_sim_vq(), image, "torch"),
        (PLAIN["IndexBackpropVQ"], lambda b: _plain_ibq(), image, "torch"),
        (PLAIN["MultiScaleResidualVQ (scales 1, 2, 4)"], lambda b: _plain_multiscale((1, 2, 4)),
         image, "torch"),
    ]


def _loss_and_output(out, x):
    """The differentiable loss (``None`` for FSQ) and the quantized output, whichever
    library's tuple ``out`` is."""
    tensors = [t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point()]
    q = next(t for t in tensors if t.shape == x.shape)
    loss = next((t for t in tensors if t.dim() == 0 and t.requires_grad), None)
    return loss, q


def _step(module, x, grads):
    loss, q = _loss_and_output(module(x), x)
    if grads[0] is None:  # first call: the gradients of the outputs, kept for every step
        grads[:] = [torch.randn_like(q), None if loss is None else torch.ones_like(loss)]
    outputs = (q,) if loss is None else (q, loss)
    torch.autograd.backward(outputs, grads[:len(outputs)])


def _clear_grads(x, params) -> None:
    """A step's gradients are new tensors, not accumulated into the last step's."""
    x.grad = None
    for p in params:
        p.grad = None


def _set_backend(module, backend: str) -> None:
    for m in module.modules():
        if isinstance(getattr(m, "backend", None), str):
            m.backend = backend


class _Case:
    """One step's module and inputs, warmed up, its kernels counted; ``sample(n)`` times
    ``n`` more steps."""

    def __init__(self, name, build, shape, kind, launches: StubbedLaunches):
        self.name, self.kind, self.launches = name, kind, launches
        self.module = build("torch")
        if self.module is None:
            return
        self.module.train()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.x = torch.randn(*shape, requires_grad=True)
        self.grads = [None, None]
        _step(self.module, self.x, self.grads)  # k-means init on the real torch path
        if kind.startswith("vqfast"):
            _set_backend(self.module, "triton")
        with self._launch_path():
            for _ in range(10):  # warm-up
                _step(self.module, self.x, self.grads)
            counting = _CountOps()
            launches.count.clear()
            _clear_grads(self.x, self.params)
            with counting:
                _step(self.module, self.x, self.grads)
        self.triton_launches = sum(launches.count.values())
        self.ops = dict(counting.ops)
        self.samples = []

    @contextlib.contextmanager
    def _launch_path(self):
        """vqfast's launch path (a module's whole forward replayed, ``ops.step_plans``, or
        each op's call, ``kernels._plan``, replaying the fast launches of
        ``kernels._launch.launch``), each op's call alone (no step plans), the fast
        launches without plans, or triton's own path at every launch."""
        _launch.FAST_LAUNCH = self.kind != "vqfast, triton's launch path"
        _plan.PLANS = self.kind in ("vqfast", "vqfast, no step plans")
        step_plans.STEP_PLANS = self.kind == "vqfast"
        try:
            yield
        finally:
            _launch.FAST_LAUNCH = _plan.PLANS = step_plans.STEP_PLANS = True

    def sample(self, steps: int) -> None:
        with self._launch_path():
            for _ in range(steps):
                _clear_grads(self.x, self.params)
                self.launches.excluded_ns = 0
                start = time.thread_time_ns()
                _step(self.module, self.x, self.grads)
                self.samples.append(time.thread_time_ns() - start - self.launches.excluded_ns)

    def row(self) -> dict:
        other = sum(self.ops.values())
        return {"name": self.name, "kind": self.kind,
                "host_us": statistics.median(self.samples) / 1e3,
                "triton_launches": self.triton_launches, "other_ops": other,
                "kernels": self.triton_launches + other, "ops": self.ops}


def run(steps: int = 300, progress=print, names=None, rounds: int = 10):
    """Every case's median host time over ``steps`` steps, taken in ``rounds`` interleaved
    rounds (each case a share of its steps per round), so that a machine whose speed drifts
    during the run moves every case alike."""
    torch.set_num_threads(1)
    launches = StubbedLaunches()
    with launches.stubbed():
        cases = []
        for name, build, shape, kind in _cases():
            if not names or name in names:
                torch.manual_seed(0)
                case = _Case(name, build, shape, kind, launches)
                if case.module is not None:
                    cases.append(case)
        for _ in range(rounds):
            for case in cases:
                case.sample(max(1, steps // rounds))
        rows = [case.row() for case in cases]
    for row in rows:
        progress(f"{row['name']}: {row['host_us']:.0f} us, {row['kernels']} kernels")
    base = next((r for r in rows if r["name"].startswith("original EMA")), None)
    by_name = {r["name"]: r for r in rows}
    for row in rows:
        row["vs_original_ema"] = base["host_us"] / row["host_us"] if base else None
        plain = by_name.get(PLAIN.get(row["name"]))
        row["vs_plain_torch"] = plain["host_us"] / row["host_us"] if plain else None
    return rows


# The shapes a GPU user runs (README: Performance), for the ahead-of-time compile of the
# specialisations the JIT really builds there: (name, builder, input shape, dtype).
RECORDED_STEPS = [
    ("VQ-VAE EMA fp32", lambda: vqfast.VectorQuantizerEMA(512, 64, backend="triton"),
     (256, 64, 8, 8), torch.float32),
    ("VQ-VAE learned bf16", lambda: vqfast.VectorQuantizer(512, 64, backend="triton"),
     (256, 64, 8, 8), torch.bfloat16),
    ("large EMA bf16", lambda: vqfast.VectorQuantizerEMA(16384, 256, backend="triton"),
     (64, 256, 32, 32), torch.bfloat16),
    ("large EMA bf16 tokens", lambda: vqfast.VectorQuantizerEMA(
        16384, 256, backend="triton", channel_last=True), (64, 1024, 256), torch.bfloat16),
    ("large EMA tf32x3", lambda: vqfast.VectorQuantizerEMA(
        16384, 256, backend="triton", precision="tf32x3"), (64, 256, 32, 32), torch.float32),
]


def step_inputs(build, shape, dtype, device="cpu"):
    """A step's module (in training mode) and its input ``x``, seeded alike on any device."""
    torch.manual_seed(0)
    return (build().to(device, dtype).train(),
            torch.randn(*shape, device=device, dtype=dtype, requires_grad=True))


def recorded_steps(steps, launches: StubbedLaunches, count_ops: bool = False):
    """Each step of ``steps`` on CPU stand-ins, its launches recorded by ``launches``: the
    first step (k-means init), then a trained one. Yields ``(name, start, trained, ops)``:
    where the step's launches and its trained step's begin in ``launches.launch_log``, and
    the trained step's other compute ops (a Counter; empty unless ``count_ops``)."""
    with launches.stubbed():
        for name, build, shape, dtype in steps:
            module, x = step_inputs(build, shape, dtype)
            grads = [None, None]
            start = len(launches.launch_log)
            _step(module, x, grads)
            x.grad = None
            trained = len(launches.launch_log)
            counting = _CountOps()
            with counting if count_ops else contextlib.nullcontext():
                _step(module, x, grads)
            yield name, start, trained, counting.ops


def record_specializations(steps=RECORDED_STEPS) -> list:
    """Each distinct kernel specialisation the steps launch (forward, backward, update;
    k-means init), as triton's JIT would compile it: ``StubbedLaunches.recorded`` records,
    each with ``cases`` naming the steps that launch it (``"<step> k-means init"`` for the
    first step's launches that the trained step does not repeat)."""
    launches = StubbedLaunches(record=True)
    cases = collections.defaultdict(list)
    for name, start, trained, _ in recorded_steps(steps, launches):
        keys = [(kernel, key) for kernel, key, *_ in launches.launch_log]
        steady = dict.fromkeys(keys[trained:])
        for launch in steady:
            cases[launch].append(name)
        for launch in dict.fromkeys(keys[start:trained]):
            if launch not in steady:
                cases[launch].append(f"{name} k-means init")
    return [dict(record, cases=cases[launch]) for launch, record in launches.recorded.items()]


def environment() -> dict:
    import triton
    return {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "threads": 1,
            "date": time.strftime("%Y-%m-%d"), "shape": f"[{B}, {D}, {H}, {W}], K={K}"}


def markdown(env: dict, rows) -> str:
    lines = [f"Host cost of one eager training step (forward, backward, update) on "
             f"{env['machine']}, 1 thread, torch {env['torch']}, triton {env['triton']}; "
             f"Triton launches stubbed at triton's cache-hit work, tiny CPU stand-in tensors "
             f"{env['shape']}. Kernels: what a GPU would run per step.", "",
             "| step | host time (us) | vs the original EMA step | GPU kernels (Triton + other) "
             "| vs the same algorithm in plain torch |",
             "|---|---:|---|---:|---|"]
    for r in rows:
        words = ("1x" if r["name"].startswith("original EMA")
                 else _ratio_words(r["vs_original_ema"]))
        lines.append(f"| {r['name']} | {r['host_us']:.0f} | {words} | {r['kernels']} "
                     f"({r['triton_launches']} + {r['other_ops']}) | "
                     f"{_ratio_words(r.get('vs_plain_torch'))} |")
    lines += ["", "Plain torch: the family's oracle (`vqfast.reference`, written from the "
              "paper) with the same parameters, and the EMA update by the original's formulas "
              "where the vqfast module keeps an EMA codebook; for `ResidualVQ`, "
              "vector-quantize-pytorch's (when installed)."]
    return "\n".join(lines) + "\n"


def _ratio_words(ratio) -> str:
    """``baseline / this`` host time in words."""
    if ratio is None:
        return ""
    return f"{ratio:.1f}x less host time" if ratio >= 1 else f"{1 / ratio:.1f}x more host time"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per case (median)")
    parser.add_argument("--out", type=Path, help="write <date>-cpu-host.json and .md here")
    parser.add_argument("--rounds", type=int, default=10,
                        help="interleaved rounds the steps are split into (drift moves every case alike)")
    parser.add_argument("--case", action="append", help="only this case (repeatable)")
    args = parser.parse_args(argv)
    rows = run(args.steps, names=args.case, rounds=args.rounds)
    env = environment()
    save_report(args.out, "cpu-host", env, rows, markdown(env, rows))


if __name__ == "__main__":
    main()
