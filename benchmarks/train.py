"""``python -m benchmarks.train``: VQ-VAE training throughput on synthetic CIFAR-shaped data.

Times one full training step (encoder, quantizer, decoder, backward, Adam, EMA update) of
the original notebook's VQ-VAE three ways: eager, ``torch.compile`` and, on CUDA, replayed
from one CUDA graph; each is the steady step, timed after ``--warmup-steps`` untimed steps
(k-means on the first, compilation, autotuning, the first re-seeds). Also measures the quantizer's share of the eager step, counts the kernels one
quantizer training step launches (CUDA profiler), runs an eager step under
``torch.cuda.set_sync_debug_mode("error")`` (a host sync raises), and checks that graph
replays track eager training on the same batches. Writes one JSON file.

``--dry-run``: CPU-sized (batch 8, a few steps, ``aot_eager``), checks the pipeline only.
"""

import argparse
import copy
import json
import statistics
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import vqfast

from .measure import median_seconds, quiet_stderr, timing_threads


def _model(args, device):
    """The VQ-VAE with the EMA quantizer: its own default threshold unless one is given."""
    torch.manual_seed(0)
    options = {} if args.dead_code_threshold is None else {"dead_code_threshold": args.dead_code_threshold}
    return vqfast.VQVAE(args.num_hiddens, 2, 32, args.num_embeddings, 64, 0.25, 0.99,
                        kmeans_init=args.kmeans_init, **options).to(device)


def _optimizer(model, device):
    # capturable: Adam keeps its step count on the device, so the step can be graphed
    return torch.optim.Adam(model.parameters(), lr=1e-4, capturable=device.type == "cuda")


def _loss(model, x):
    vq_loss, recon, perplexity = model(x)
    return vq_loss + F.mse_loss(recon, x), perplexity


def _step(model, opt, x):
    loss, perplexity = _loss(model, x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    return loss.detach(), perplexity.detach()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steady(step, batches, device, args) -> dict:
    """The steady step: ``args.warmup_steps`` untimed steps (k-means on the first,
    compilation, autotuning, the first re-seeds; their time is reported apart), then the
    median of ``args.steps`` timed steps (a median: a step slowed by another job on the
    machine does not move it) and their mean; on a CPU on the threads ``median_seconds``
    times on, as the quantizer's share is."""
    with timing_threads(device):
        return _timed(step, batches, device, args)


def _timed(step, batches, device, args) -> dict:
    start = time.perf_counter()
    for i in range(args.warmup_steps):
        step(batches[i % len(batches)])
    _sync(device)
    warmup_s = time.perf_counter() - start
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        step(batches[(args.warmup_steps + i) % len(batches)])
        _sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"steps_per_s": 1 / median, "step_ms": median * 1e3,
            "mean_step_ms": 1e3 * sum(times) / len(times), "timed_steps": args.steps,
            "warmup_steps": args.warmup_steps, "warmup_s": warmup_s}


def eager(args, device, batches):
    model = _model(args, device)
    opt = _optimizer(model, device)
    return _steady(lambda x: _step(model, opt, x), batches, device, args)


def compiled(args, device, batches):
    model = _model(args, device)
    opt = _optimizer(model, device)
    backend = "aot_eager" if args.dry_run else "inductor"
    # k-means init eagerly first: its flag would otherwise compile the model a second time
    _step(model, opt, batches[0])
    model_c = torch.compile(model, fullgraph=True, backend=backend)
    start = time.perf_counter()
    _step(model_c, opt, batches[0])
    _sync(device)
    compile_s = time.perf_counter() - start
    return {**_steady(lambda x: _step(model_c, opt, x), batches, device, args),
            "backend": backend, "first_step_s": compile_s}


def cuda_graph(args, device, batches):
    """Capture a whole training step once, replay it; compare with eager on the same data."""
    if device.type != "cuda":
        return {"skipped": "CUDA graphs need a CUDA device"}
    model = _model(args, device)
    opt = _optimizer(model, device)
    twin = copy.deepcopy(model)
    twin_opt = _optimizer(twin, device)
    static_x = batches[0].clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the capture stream (k-means runs here)
        for x in batches[:3]:
            static_x.copy_(x)
            _step(model, opt, static_x)
            _step(twin, twin_opt, x)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss, static_perplexity = _loss(model, static_x)
        static_loss.backward()
        opt.step()
    losses = []
    for x in batches[3:6]:
        static_x.copy_(x)
        graph.replay()
        eager_loss, _ = _step(twin, twin_opt, x)
        losses.append((float(static_loss), float(eager_loss)))
    drift = max(abs(g - e) / max(abs(e), 1e-12) for g, e in losses)

    def replay(x):
        static_x.copy_(x)
        graph.replay()
    return {**_steady(replay, batches, device, args), "graph_vs_eager_losses": losses,
            "max_relative_loss_difference": drift, "matches_eager": drift < 1e-2}


def _quantizer_step(model, x):
    """The quantizer's own training step (forward, backward, EMA) on ``model``'s latents
    of ``x``: a zero-argument callable, and the latent shape. The backward takes
    preallocated gradients of the loss and the output, so the step launches the
    quantizer's kernels only (no loss glue of the benchmark's own)."""
    with torch.no_grad():
        z = model.pre_vq_conv(model.encoder(x))
    z.requires_grad_()
    grads = []

    def vq_step():
        loss, q, _, _ = model.vq(z)
        if not grads:
            grads.extend([torch.ones_like(loss), torch.randn_like(q)])
        z.grad = None
        torch.autograd.backward((loss, q), grads)
    return vq_step, list(z.shape)


def _host_us(step, repeats: int = 50) -> float:
    """Median thread CPU time of ``step()`` (what issuing it costs the host; on a GPU the
    kernels run on asynchronously), in microseconds."""
    samples = []
    for _ in range(repeats):
        start = time.thread_time_ns()
        step()
        samples.append(time.thread_time_ns() - start)
    return statistics.median(samples) / 1e3


def quantizer_share(args, device, batches):
    """Median time of the quantizer's own training step (forward, backward, EMA) at the
    model's latent shape, and its share of the eager model step."""
    model = _model(args, device)
    opt = _optimizer(model, device)
    vq_step, shape = _quantizer_step(model, batches[0])
    vq_s = median_seconds(vq_step, device)
    host_us = _host_us(vq_step)
    _sync(device)
    step_s = median_seconds(lambda: _step(model, opt, batches[0]), device)
    return {"latent_shape": shape, "quantizer_ms": vq_s * 1e3, "step_ms": step_s * 1e3,
            "quantizer_share": vq_s / step_s, "quantizer_host_us": host_us}


def launches(args, device, batches):
    """Kernels launched by one quantizer training step (forward + backward + EMA)."""
    if device.type != "cuda":
        return {"skipped": "kernel launches are counted on CUDA"}
    from torch.profiler import ProfilerActivity, profile
    vq_step, _ = _quantizer_step(_model(args, device), batches[0])
    vq_step()
    _sync(device)
    with quiet_stderr(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        vq_step()
        _sync(device)
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    counts = {}
    for name in kernels:
        counts[name] = counts.get(name, 0) + 1
    return {"kernels_per_step": len(kernels), "by_name": counts}


def no_host_sync(args, device, batches):
    """An eager training step (after k-means) under sync debug mode "error"."""
    if device.type != "cuda":
        return {"skipped": "torch.cuda.set_sync_debug_mode needs CUDA (tests/test_no_sync.py "
                           "checks the same on CPU)"}
    model = _model(args, device)
    opt = _optimizer(model, device)
    _step(model, opt, batches[0])
    _sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(model, opt, batches[1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"passed": True}


QUALITY_BATCH = 256  # the original's batch


def quality_curves(args, device, batches):
    """The quality benchmark at the original's scale (batch 256) for as many steps as fit
    in ``--quality-seconds``, one seed: its summary and curves (see benchmarks.quality)."""
    from . import quality
    qargs = quality.parse_args(["--quick"] if args.dry_run else [])
    if not args.dry_run:
        qargs.batch_size, qargs.steps, qargs.seeds, qargs.log_every = (QUALITY_BATCH, 100_000,
                                                                       [0], 50)
    report, _, _ = quality.run(qargs, device, deadline_s=args.quality_seconds)
    best = min(report["summary"].items(), key=lambda item: item[1]["test_nmse"]["mean"])
    report["summary_line"] = (f"best test NMSE {best[1]['test_nmse']['mean']:.4f} ({best[0]}); "
                              + ", ".join(f"{c}: {e['test_nmse']['mean']:.4f}"
                                          for c, e in report["summary"].items()))
    return report


PARTS = {"eager": eager, "compiled": compiled, "cuda_graph": cuda_graph,
         "quantizer_share": quantizer_share, "launches": launches, "no_host_sync": no_host_sync,
         "quality": quality_curves}


def parse_args(argv=None):
    """The command line's options, with the defaults that depend on ``--dry-run`` filled in."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--dry-run", action="store_true", help="CPU-sized, pipeline check only")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 (8 dry run)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 50, 3 dry run)")
    parser.add_argument("--num-hiddens", type=int, default=None)
    parser.add_argument("--num-embeddings", type=int, default=512)
    parser.add_argument("--kmeans-init", action=argparse.BooleanOptionalAction, default=True,
                        help="k-means init (default on, as the quantizers)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="untimed steps before the timed ones (default 10, 3 dry run)")
    parser.add_argument("--dead-code-threshold", type=float, default=None,
                        help="dead-code re-seeding threshold (default: the EMA quantizer's own, 0.5)")
    parser.add_argument("--quality-seconds", type=float, default=150.0,
                        help="time budget of the quality part, shared by its configurations")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (8 if args.dry_run else 256)
    args.steps = args.steps or (3 if args.dry_run else 50)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (3 if args.dry_run else 10)
    args.num_hiddens = args.num_hiddens or (32 if args.dry_run else 128)
    return args


def batches_for(args, device) -> list:
    """The 8 synthetic CIFAR-shaped batches every part steps through."""
    generator = torch.Generator().manual_seed(0)
    return [(torch.rand(args.batch_size, 3, 32, 32, generator=generator) - 0.5).to(device)
            for _ in range(8)]


def main(argv=None):
    args = parse_args(argv)
    device = (torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
              if args.device == "auto" else torch.device(args.device))
    batches = batches_for(args, device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "batch_size": args.batch_size, "steps": args.steps,
              "dry_run": args.dry_run, "model": f"VQVAE({args.num_hiddens}, 2, 32, "
                                                f"{args.num_embeddings}, 64, 0.25, 0.99)",
              "parts": {}, "failed": []}
    if args.out.exists():  # a second invocation (the GPU command's quality part) adds its parts
        previous = json.loads(args.out.read_text())
        report["parts"] = {**previous.get("parts", {}), **report["parts"]}
        report["failed"] = [f for f in previous.get("failed", []) if f not in args.parts]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.parts:
        print(f"train benchmark: {name} ...", flush=True)
        try:
            report["parts"][name] = PARTS[name](args, device, batches)
        except Exception as error:  # record it, go on with the other parts
            report["parts"][name] = {"error": f"{type(error).__name__}: {error}",
                                     "traceback": traceback.format_exc()[-4000:]}
            report["failed"].append(name)
        print(f"  {json.dumps(report['parts'][name])[:300]}", flush=True)
        args.out.write_text(json.dumps(report, indent=1))  # a run cut off keeps what finished
    graph = report["parts"].get("cuda_graph", {})
    if graph.get("matches_eager") is False:
        report["failed"].append("cuda_graph (replays drift from eager)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"train.json: {args.out}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
