"""Production features: distributed EMA sync, k-means init, dead codes, usage, AMP,
determinism, torch.compile over the whole VQ-VAE."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vqfast
from _util import ORIGINAL, BACKENDS, DEVICE, TOL, assert_nearest, tensor_state


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, batches, init_state, dead_code_threshold, ema, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(1234)  # the same re-seeding draws on every rank
        cls = vqfast.VectorQuantizerEMA if ema else vqfast.VectorQuantizer
        vq = cls(40, 6, 0.25, backend="torch", dead_code_threshold=dead_code_threshold)
        vq.load_state_dict(init_state)
        for batch in batches:
            vq(batch.chunk(world)[rank])
        # numpy arrays travel by value (shared tensors would die with this process)
        queue.put((rank, {k: v.numpy().copy() for k, v in tensor_state(vq).items()}))
        dist.barrier()  # both ranks done before either tears gloo down
    finally:
        dist.destroy_process_group()


def spawn_two_ranks(worker, *args):
    """Run ``worker(rank, 2, port, *args, queue)`` on 2 spawned processes; each puts
    ``(rank, result)`` on the queue. Returns ``{rank: result}`` once both exited cleanly."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, *args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)  # a hang fails here, not forever
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def _two_rank_states(batches, init_state, dead_code_threshold, ema=True):
    results = spawn_two_ranks(_ddp_worker, batches, init_state, dead_code_threshold, ema)
    return {rank: {k: torch.from_numpy(v) for k, v in state.items()}
            for rank, state in results.items()}


@pytest.mark.parametrize("dead_code_threshold", [0.0, 0.5])
def test_two_process_gloo_sync_equals_one_process_on_the_whole_batch(dead_code_threshold):
    batches = [torch.randn(4, 6, 5, 3) for _ in range(3)]
    single = vqfast.VectorQuantizerEMA(40, 6, 0.25, backend="torch", **ORIGINAL)
    init_state = copy.deepcopy(single.state_dict())
    states = _two_rank_states(batches, init_state, dead_code_threshold)
    for key in states[0]:  # both ranks hold identical buffers
        assert torch.equal(states[0][key], states[1][key]), key
    if dead_code_threshold == 0:
        for batch in batches:
            single(batch)
        for key, value in tensor_state(single).items():
            torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-5)


def test_two_process_learned_codebook_reseeds_the_same_codes_on_every_rank():
    """The learned codebook's usage is summed over ranks and re-seeding draws rank 0's
    rows: both ranks end with the same codebook (DDP would not re-sync it)."""
    batches = [torch.randn(4, 6, 5, 3) + 2 * i for i in range(4)]  # drifting: codes die
    init_state = copy.deepcopy(vqfast.VectorQuantizer(40, 6, 0.25, backend="torch",
                                                      kmeans_init=False).state_dict())
    states = _two_rank_states(batches, init_state, 1.0, ema=False)
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    assert int(states[0]["reseeded_codes"]) > 0


def _clustered(num_clusters=32, dim=8, per_cluster=64, seed=0):
    """Tight Gaussian clusters far from the N(0, 1) codebook init: [N, D] rows and a sampler."""
    g = torch.Generator().manual_seed(seed)
    centers = 4 + 3 * torch.randn(num_clusters, dim, generator=g)

    def batch():
        labels = torch.randint(num_clusters, (num_clusters * per_cluster,), generator=g)
        x = centers[labels] + 0.1 * torch.randn(len(labels), dim, generator=g)
        return x.T.reshape(1, dim, -1)  # channels-first [1, D, N]
    return batch


def _train_perplexity(steps=30, **options):
    torch.manual_seed(0)
    vq = vqfast.VectorQuantizerEMA(32, 8, 0.25, 0.9, **options).to(DEVICE)
    batch = _clustered()
    for _ in range(steps):
        _, _, perplexity, _ = vq(batch().to(DEVICE))
    vq.eval()
    return float(vq(batch().to(DEVICE))[2]), vq


def test_dead_codes_and_kmeans_raise_codebook_usage():
    default, vq_default = _train_perplexity(**ORIGINAL)
    reseeded, vq_reseeded = _train_perplexity(kmeans_init=False, dead_code_threshold=1.0)
    kmeans, _ = _train_perplexity(kmeans_init=True, dead_code_threshold=0.0)
    assert reseeded > 1.5 * default, (default, reseeded)
    assert kmeans > 1.5 * default, (default, kmeans)
    assert vq_default.codebook_usage().dead_codes > vq_reseeded.codebook_usage().dead_codes


def test_codebook_usage():
    vq = vqfast.VectorQuantizerEMA(5, 2, 0.25, **ORIGINAL)
    with torch.no_grad():
        vq.ema_cluster_size.copy_(torch.tensor([4.0, 0.5, 0.0, 3.5, 2.0]))
        vq.ema_decay_weight.fill_(1.0)
    usage = vq.codebook_usage()
    torch.testing.assert_close(usage.usage, torch.tensor([0.4, 0.05, 0.0, 0.35, 0.2]))
    assert usage.dead_codes == 2 and usage.alive_codes == 3
    assert vq.codebook_usage(threshold=3.0).dead_codes == 3
    with torch.no_grad():  # half the EMA's weight so far: sizes count double
        vq.ema_decay_weight.fill_(0.5)
    assert vq.codebook_usage(threshold=3.0).dead_codes == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_matches_lloyd_on_separated_clusters(backend):
    batch = _clustered(num_clusters=6, dim=3, per_cluster=20)
    x = batch()[0].T.contiguous().to(DEVICE)
    torch.manual_seed(3)
    centroids, counts = vqfast.kmeans(x, 6, iters=10, backend=backend)
    assert int(counts.sum()) == x.shape[0]
    idx, _ = vqfast.nearest_code(x, centroids, backend=backend)  # a fixed point of Lloyd:
    assert_nearest(x, centroids, idx)
    for k in range(6):
        if counts[k] > 0:
            torch.testing.assert_close(centroids[k], x[idx == k].mean(0), rtol=1e-4, atol=1e-4)


def test_kmeans_init_runs_once_and_survives_checkpoints():
    vq = vqfast.VectorQuantizerEMA(8, 3, 0.25, kmeans_init=True)
    before = vq.codebook.clone()
    z = torch.randn(2, 3, 4, 4) + 5
    vq(z)
    assert bool(vq.initialized) and not torch.equal(vq.codebook, before)
    twin = vqfast.VectorQuantizerEMA(8, 3, 0.25, kmeans_init=True)
    twin.load_state_dict(vq.state_dict())
    codebook = twin.codebook.clone()
    twin.eval()
    twin(z)  # eval: no k-means, no update
    assert torch.equal(twin.codebook, codebook)
    seed_style = vqfast.VectorQuantizerEMA(8, 3, 0.25, kmeans_init=True)
    seed_style.load_state_dict({k: v for k, v in tensor_state(vq).items() if k != "initialized"})
    assert bool(seed_style.initialized)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["plain", "ema"])
def test_autocast_bf16(kind, backend):
    cls = vqfast.VectorQuantizerEMA if kind == "ema" else vqfast.VectorQuantizer
    vq = cls(24, 8, 0.25, backend=backend).to(DEVICE)
    conv = torch.nn.Conv2d(3, 8, 1).to(DEVICE)
    x = torch.randn(2, 3, 5, 5, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        z = conv(x)
        loss, q, perplexity, enc = vq(z)
    assert z.dtype == torch.bfloat16 and q.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    for buffer in vq.buffers():
        assert buffer.dtype in (torch.float32, torch.bool, torch.int64)
    if kind == "plain":  # (the EMA codebook has moved since the codes were chosen)
        assert_nearest(z.detach().float().movedim(1, -1).reshape(-1, 8), vq.codebook.detach(),
                       enc.reshape(-1), torch.bfloat16)
    (loss + q.float().sum()).backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def _deterministic_run(backend):
    torch.manual_seed(7)
    model = vqfast.VQVAE(16, 1, 8, 20, 8, 0.25, 0.99, backend=backend, **ORIGINAL).to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        x = torch.rand(2, 3, 8, 8, device=DEVICE) - 0.5
        loss, recon, _ = model(x)
        (loss + (recon - x).pow(2).mean()).backward()
        opt.step()
        opt.zero_grad()
    return [t.clone() for t in tensor_state(model).values()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_runs_are_bitwise_equal(backend):
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _deterministic_run(backend), _deterministic_run(backend)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("decay", [0.0, 0.99])
def test_compiled_vqvae_matches_eager(decay):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = vqfast.VQVAE(16, 1, 8, 20, 8, 0.25, decay, backend="torch", **ORIGINAL)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        x = torch.rand(2, 3, 8, 8) - 0.5
        outs = [m(x) for m in (eager, compiled)]
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, **TOL[torch.float32])
        for loss, recon, _ in outs:
            (loss + (recon - x).pow(2).mean()).backward()
        for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for key, value in tensor_state(eager).items():
        torch.testing.assert_close(twin.state_dict()[key], value, rtol=1e-5, atol=1e-5)
