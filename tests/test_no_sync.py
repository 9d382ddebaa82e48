"""A training step reads nothing back to the host (DESIGN "No host sync in a training step").

A ``TorchDispatchMode`` records every aten op of a step (forward, backward, EMA update,
with each option), following the vqfast custom ops into their implementations, and fails
on the ops that wait for the device: ``_local_scalar_dense`` (``.item()``, ``bool(t)``,
``int(t)``), ``is_nonzero``, ``nonzero`` (boolean-mask indexing) and ``bincount`` (which
reads ``max(idx)`` on CUDA), and on tensors built from host data inside the step
(``torch.tensor(list, device=...)``: ``lift_fresh``, and ``_to_copy`` from the CPU to
another device), a blocking host-to-device copy that also breaks CUDA-graph capture. On
CPU such a copy costs nothing and syncs nothing: only the recorder sees it. Every option
runs with and without ``torch.use_deterministic_algorithms``. The same steps must trace
with ``torch.compile(fullgraph=True)``.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

import vqfast
from vqfast import _torch, quantizer_base
from _util import ORIGINAL, BACKENDS, DEVICE

SYNCING_OPS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.item",
               "aten.bincount")
HOST_DATA_OPS = ("aten.lift_fresh", "aten.lift_fresh_copy")


class HostReads(TorchDispatchMode):
    """Records the syncing ops dispatched inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __enter__(self):  # the rule a CUDA device runs, not the CPU's shortcuts
        self._shortcuts, _torch.CPU_SHORTCUTS = _torch.CPU_SHORTCUTS, False
        return super().__enter__()

    def __exit__(self, *exc):
        _torch.CPU_SHORTCUTS = self._shortcuts
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if name in SYNCING_OPS or name in HOST_DATA_OPS:
            self.found.append(name)
        elif name == "aten._to_copy" and _host_to_device(args, kwargs):
            self.found.append("aten._to_copy from cpu")
        if func._schema.name in OPDEFS:  # look inside the custom ops too
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


def _host_to_device(args, kwargs):
    device = kwargs.get("device")
    return (isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu"
            and device is not None and torch.device(device).type != "cpu")


OPTIONS = {
    "plain": (vqfast.VectorQuantizer, {}),  # the defaults: k-means init, dead-code re-seeding
    "plain+original-algorithm": (vqfast.VectorQuantizer, dict(ORIGINAL)),
    "plain+kmeans": (vqfast.VectorQuantizer, dict(kmeans_init=True)),
    "ema": (vqfast.VectorQuantizerEMA, {}),
    "ema+original-algorithm": (vqfast.VectorQuantizerEMA, dict(ORIGINAL)),
    "ema+kmeans": (vqfast.VectorQuantizerEMA, dict(kmeans_init=True)),
    "ema+dead_codes": (vqfast.VectorQuantizerEMA, dict(dead_code_threshold=2.0)),
    "ema+all": (vqfast.VectorQuantizerEMA, dict(kmeans_init=True, dead_code_threshold=1.0,
                                                 sync_distributed=True)),
    "plain+cosine+rotation": (vqfast.VectorQuantizer, dict(cosine=True, rotation_trick=True)),
    "ema+cosine+codebook_dim+dead_codes": (vqfast.VectorQuantizerEMA, dict(
        cosine=True, codebook_dim=3, dead_code_threshold=1.0, rotation_trick=True)),
    "residual": (vqfast.ResidualVQ, dict(ema=False, rotation_trick=True)),
    "residual+shared+ema": (vqfast.ResidualVQ, dict(shared_codebook=True, kmeans_init=True)),
    "residual+relative-dead-codes": (vqfast.ResidualVQ, dict(dead_code_rule="relative",
                                                             dead_code_threshold=0.5)),
    "ema+warn_on_collapse": (vqfast.VectorQuantizerEMA, dict(warn_on_collapse=1)),
    "ema+frozen": (vqfast.VectorQuantizerEMA, dict(freeze_codebook=True, kmeans_init=True)),
    "residual+frozen": (vqfast.ResidualVQ, dict(ema=False, freeze_codebook=True)),
    "plain+channel_last+codebook_dim": (vqfast.VectorQuantizer, dict(channel_last=True,
                                                                      codebook_dim=3)),
    "ema+channel_last": (vqfast.VectorQuantizerEMA, dict(channel_last=True)),
    "residual+channel_last": (vqfast.ResidualVQ, dict(channel_last=True, groups=1)),
    "residual+per-level-sizes": (vqfast.ResidualVQ, dict(num_embeddings=(19, 11, 7))),
}


def _inputs(vq):
    """A [3, 5, 4, 3] batch in the module's layout (channel-last: [3, 4, 3, 5])."""
    shape = (3, 4, 3, 5) if vq.channel_last else (3, 5, 4, 3)
    return torch.randn(*shape, device=DEVICE, requires_grad=True)


def _make(cls, kw, backend):
    kw = dict(kw)
    watch = kw.pop("warn_on_collapse", None)
    if cls is vqfast.ResidualVQ:
        module = cls(3, kw.pop("num_embeddings", 19), 5, 0.25, backend=backend, **kw).to(DEVICE)
    else:
        module = cls(19, 5, 0.25, backend=backend, **kw).to(DEVICE)
    return module.warn_on_collapse(watch) if watch else module


@pytest.fixture
def single_rank_group(monkeypatch):
    """A one-process gloo group that the quantizers take for two ranks: the distributed
    code path (all-reduce, broadcast) runs for real."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    monkeypatch.setattr(quantizer_base, "_world_size", lambda: 2)
    yield
    dist.destroy_process_group()


def _step(vq, z):
    loss, q, perplexity, codes = vq(z)
    (loss + q.float().pow(2).mean()).backward()
    return perplexity


@pytest.fixture(params=[False, True], ids=["atomics", "deterministic"])
def deterministic(request):
    if request.param:
        torch.use_deterministic_algorithms(True)
    yield request.param
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", OPTIONS)
def test_training_step_reads_nothing_on_the_host(option, backend, deterministic, request):
    cls, kw = OPTIONS[option]
    if kw.get("sync_distributed"):
        request.getfixturevalue("single_rank_group")
    vq = _make(cls, kw, backend)
    _step(vq, _inputs(vq))  # k-means: once
    z = _inputs(vq)
    with HostReads() as recorder:
        _step(vq, z)
    assert recorder.found == [], recorder.found
    if isinstance(vq, vqfast.VectorQuantizerEMA):
        assert int(vq.skipped_batches) == 0


def test_recorder_sees_a_host_read():
    """The recorder itself can fail: it catches the old eager finiteness check."""
    with HostReads() as recorder:
        bool(torch.isfinite(torch.randn(3)).all())
        (torch.randn(4) > 0).nonzero()
        torch.tensor([0, 1])
    assert "aten._local_scalar_dense" in recorder.found and "aten.nonzero" in recorder.found
    assert "aten.lift_fresh" in recorder.found
    assert _host_to_device((torch.zeros(2),), dict(device="cuda"))
    assert not _host_to_device((torch.zeros(2),), dict(device="cpu"))


def test_vqvae_training_step_reads_nothing_on_the_host():
    model = vqfast.VQVAE(16, 1, 8, 20, 8, 0.25, 0.99, kmeans_init=True,
                         dead_code_threshold=1.0).to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(2):
        x = torch.rand(2, 3, 8, 8, device=DEVICE) - 0.5
        with HostReads() as recorder:
            loss, recon, _ = model(x)
            (loss + (recon - x).pow(2).mean()).backward()
        opt.step()  # (Adam reads its step count on CPU unless capturable=True)
        opt.zero_grad()
        if step:  # after the k-means step
            assert recorder.found == [], recorder.found


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", [o for o in OPTIONS if "all" not in o])
def test_every_option_compiles_fullgraph(option, backend):
    """Item 6 of the hardening issue: k-means init and dead-code re-seeding trace."""
    torch._dynamo.reset()
    cls, kw = OPTIONS[option]
    vq = _make(cls, kw, backend)
    compiled = torch.compile(vq, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        z = _inputs(vq)
        perplexity = _step(compiled, z)
        assert bool(torch.isfinite(perplexity).all()) and bool(torch.isfinite(z.grad).all())
    if vq.kmeans_init:  # (a frozen codebook takes no k-means init)
        assert bool(vq.initialized) != bool(kw.get("freeze_codebook"))


class Launches(HostReads):
    """Counts what a step launches on the device: Triton kernels and the aten ops that
    run a kernel (views, allocations without fill and the interpreter's own copies aside)."""

    FREE = {"aten.view", "aten.reshape", "aten.empty", "aten.detach", "aten.alias", "aten.t",
            "aten.permute", "aten.movedim", "aten.slice", "aten.select", "aten.unsqueeze",
            "aten.squeeze", "aten.expand", "aten.empty_like", "aten.new_empty", "aten.as_strided",
            "aten._unsafe_view", "aten.empty_strided", "aten.new_empty_strided", "aten.to",
            "aten.lift_fresh", "aten.ones_like", "aten.set_"}

    def __init__(self):
        super().__init__()
        self.kernels = []
        self._in_triton = False

    def __enter__(self):
        import triton.runtime.jit as jit
        from triton.runtime.interpreter import InterpretedFunction
        self._patched = []
        for cls in (jit.JITFunction, InterpretedFunction):
            original = cls.run
            recorder = self

            def run(fn_self, *args, _original=original, **kwargs):
                if recorder._in_triton:  # the interpreter's run goes through the JIT's
                    return _original(fn_self, *args, **kwargs)
                recorder.kernels.append("triton:" + getattr(fn_self.fn, "__name__", "?"))
                recorder._in_triton = True
                try:
                    return _original(fn_self, *args, **kwargs)
                finally:
                    recorder._in_triton = False
            cls.run = run
            self._patched.append((cls, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for cls, original in self._patched:
            cls.run = original
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if not self._in_triton and name not in self.FREE and func._schema.name not in OPDEFS:
            self.kernels.append(name)
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton path is not available here")
@pytest.mark.parametrize("kind,budget", [("ema", 8), ("plain", 6)])
def test_kernels_per_training_step(kind, budget):
    """The Triton path's launches per quantizer training step (forward, backward, EMA):
    EMA 8 = codebook prologue, nearest code, two zero-fills, gather+loss+perplexity, EMA
    scalars, EMA finalize, backward; plain 6 = prologue, nearest, zero-fill, gather, the
    codebook gradient's zero-fill, backward. Guards against glue creeping back in."""
    cls = vqfast.VectorQuantizerEMA if kind == "ema" else vqfast.VectorQuantizer
    vq = cls(37, 9, 0.25, backend="triton", **ORIGINAL).to(DEVICE)
    z = torch.randn(2, 9, 5, 3, device=DEVICE, requires_grad=True)
    grad = torch.randn_like(z)
    vq(z)
    with Launches() as recorder:
        loss, q, _, _ = vq(z)
        torch.autograd.backward([loss, q], [torch.ones_like(loss), grad])
    assert len(recorder.kernels) <= budget, recorder.kernels
    assert sum(k.startswith("triton") for k in recorder.kernels) >= budget - 3
