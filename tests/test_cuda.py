"""What only a GPU can show: 64-bit offsets past 2**31 elements, a training step under
the CUDA sync debugger, and a whole VQ-VAE step captured in a CUDA graph."""

import argparse

import pytest
import torch

import vqfast
from _util import ORIGINAL, BACKENDS, DEVICE, INTERPRETED, assert_nearest

cuda_only = pytest.mark.skipif(INTERPRETED, reason="needs a CUDA device")


def _free_gib():
    return torch.cuda.mem_get_info()[0] / 2**30


@cuda_only
@pytest.mark.parametrize("layout", ["rows", "channels_first"])
def test_more_than_2_31_elements(layout):
    """N x D > 2**31: the tile bases are 64-bit, the in-tile offsets 32-bit."""
    if _free_gib() < 30:
        pytest.skip(f"needs ~30 GiB free, {_free_gib():.0f} GiB here")
    d, k = 64, 40
    n = 2**31 // d + 4099
    torch.manual_seed(0)
    codebook = torch.randn(k, d, device=DEVICE)
    if layout == "rows":
        x = torch.randn(n, d, device=DEVICE, dtype=torch.bfloat16)
        idx, _ = vqfast.nearest_code(x, codebook)
        tail = x[-3000:].float()
        assert_nearest(tail, codebook.bfloat16().float(), idx[-3000:], torch.bfloat16)
        return
    s = 64
    b = n // s + 1
    vq = vqfast.VectorQuantizerEMA(k, d, 0.25, **ORIGINAL).to(DEVICE)
    vq.codebook.copy_(codebook)
    z = torch.randn(b, d, s, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    loss, q, perplexity, codes = vq(z)
    q.sum().backward()
    assert z.numel() > 2**31 and bool(torch.isfinite(loss))
    tail_x = z[-40:].detach().float().movedim(1, -1).reshape(-1, d)
    tail_codes = codes[-40:].reshape(-1)
    assert_nearest(tail_x, codebook.bfloat16().float(), tail_codes, torch.bfloat16)
    torch.testing.assert_close(q[-40:].float().movedim(1, -1).reshape(-1, d),
                               codebook[tail_codes].bfloat16().float())
    assert bool((z.grad[-40:] == 1).all())  # straight through; no commitment term used


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32"])
@pytest.mark.parametrize("kind", ["plain", "ema"])
def test_module_precisions_match_the_oracle(kind, precision, backend):
    """Each fp32 dot precision through the whole module: nearest codes within the
    precision's tie slack, the loss and EMA state as the oracle's from the same codes."""
    b, d, s, k = (64, 64, 64, 512) if not INTERPRETED else (2, 9, 21, 37)
    torch.manual_seed(0)
    cls = vqfast.VectorQuantizerEMA if kind == "ema" else vqfast.VectorQuantizer
    vq = cls(k, d, 0.25, backend=backend, precision=precision, **ORIGINAL).to(DEVICE)
    with torch.no_grad():
        vq.codebook.normal_()
    codebook = vq.codebook.detach().clone()
    z = torch.randn(b, d, s, device=DEVICE)
    loss, q, _, codes = vq(z)
    x = z.movedim(1, -1).reshape(-1, d)
    slack = torch.float32 if precision != "tf32" else torch.bfloat16  # tf32: 10-bit mantissa
    assert_nearest(x, codebook, codes.reshape(-1), slack)
    chosen = codebook[codes.reshape(-1)]
    torch.testing.assert_close(q.movedim(1, -1).reshape(-1, d), chosen)
    scale = 0.25 if kind == "ema" else 1.25
    torch.testing.assert_close(loss, scale * (chosen - x).pow(2).mean(), rtol=1e-4, atol=1e-6)
    if kind == "ema":  # the seed's cluster-size update from these codes
        onehot = torch.nn.functional.one_hot(codes.reshape(-1), k).float()
        size = 0.01 * onehot.sum(0)
        n = size.sum()
        size = (size + 1e-5) / (n + k * 1e-5) * n
        torch.testing.assert_close(vq.ema_cluster_size, size, rtol=1e-5, atol=1e-6)


@cuda_only
def test_training_step_under_sync_debug_mode_error():
    model = vqfast.VQVAE(32, 1, 16, 64, 16, 0.25, 0.99, kmeans_init=True,
                         dead_code_threshold=1.0).to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    for step in range(3):
        x = torch.rand(8, 3, 32, 32, device=DEVICE) - 0.5
        if step:  # after the k-means step
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss, recon, _ = model(x)
            (loss + (recon - x).pow(2).mean()).backward()
            opt.step()
            opt.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@cuda_only
def test_cuda_graph_of_a_vqvae_step_tracks_eager():
    from benchmarks import train
    args = argparse.Namespace(num_hiddens=32, num_embeddings=64, kmeans_init=False,
                              dead_code_threshold=0.0, steps=3, dry_run=False)
    batches = [torch.rand(16, 3, 32, 32, device=DEVICE) - 0.5 for _ in range(8)]
    result = train.cuda_graph(args, DEVICE, batches)
    assert result["matches_eager"], result


@cuda_only
def test_planned_training_steps_compute_what_the_ops_compute(monkeypatch):
    """Launch plans (``vqfast.kernels._plan``, ``vqfast.ops.step_plans``) on a GPU: every
    quantizer's training steps with their ops' calls, or whole forwards, replayed from plans
    give the outputs, gradients and state of their own calls (the CPU tests compare the
    launches; this, what they compute). Each
    step starts from the same state (the one after the first step), so that the order of
    the statistics' atomics cannot move a near-tie's code between the two runs."""
    import copy
    from benchmarks import host
    from vqfast.kernels import _launch, _plan
    monkeypatch.setattr(_launch, "CHECK_LAUNCH_KEYS", False)  # (which turns plans off)

    def run(plans):
        monkeypatch.setattr(_plan, "PLANS", plans)
        _launch.forget_fast_launches()
        results = {}
        for name, build, shape, kind in host._cases():
            if kind != "vqfast":
                continue
            torch.manual_seed(0)
            module = build("auto").to(DEVICE).train()
            x = torch.randn(*shape, device=DEVICE, requires_grad=True)
            grads = [None, None]
            seen = []
            # (a call key's third call replays its plan; a step plan's backward has a plan
            # of its own, replayed from its third replay on; k-means changes the module)
            for step in range(8):
                if step == 1:
                    start = copy.deepcopy(module.state_dict())
                elif step > 1:
                    module.load_state_dict(start)
                out = module(x)
                seen += [t.detach().clone() for t in out if isinstance(t, torch.Tensor)]
                loss, q = host._loss_and_output(out, x)
                if grads[0] is None:
                    grads[:] = [torch.randn_like(q),
                                None if loss is None else torch.ones_like(loss)]
                outputs = (q,) if loss is None else (q, loss)
                torch.autograd.backward(outputs, grads[:len(outputs)])
                seen.append(x.grad.clone())
                x.grad = None
                seen += [t.detach().clone() for t in module.state_dict().values()
                         if isinstance(t, torch.Tensor)]
            results[name] = seen
        return results

    own, planned = run(False), run(True)
    for name in own:
        assert len(own[name]) == len(planned[name]), name
        for a, b in zip(own[name], planned[name]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
