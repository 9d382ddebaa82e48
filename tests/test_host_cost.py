"""The thin eager step: dead-code re-seeding fused into the EMA update (both backends
against the oracle's EMA step and the dead-code rule), the custom ops called directly in
eager mode, and the host-cost benchmark's kernel counts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vqfast
from vqfast import reference
from vqfast.ops import dispatch
from vqfast.ops.vq import ema_update

from _util import DEVICE

pytestmark = pytest.mark.chaos


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_reseed_follows_the_dead_code_rule(backend, dtype):
    k, d, b, s, decay, eps, threshold = 37, 19, 3, 7, 0.9, 1e-5, 0.5
    x = torch.randn(b, d, s, device=DEVICE).to(dtype)
    size = torch.rand(k, device=DEVICE) * 2
    size[::3] = 0.0  # dead before and after this batch unless they get rows
    weight = torch.randn(k, d, device=DEVICE)
    counts = torch.zeros(k, dtype=torch.int32, device=DEVICE)
    counts[1::3] = 2
    sums = torch.randn(k, d, device=DEVICE) * counts[:, None]
    state = [size.clone(), weight.clone(), torch.empty(k, d, device=DEVICE),
             torch.tensor(0.5, device=DEVICE), torch.tensor(0, device=DEVICE)]
    seed, reseeded = torch.tensor([7], device=DEVICE), torch.tensor(0, device=DEVICE)
    loss = torch.tensor(1.0, device=DEVICE)
    applied = ema_update(counts, sums, loss, None, *state, decay, eps, backend,
                         reseed=(x, seed, reseeded, threshold))
    size_ref, weight_ref, book_ref = reference.ema_step(size, weight, counts.float(), sums, decay, eps)
    decay_weight = 0.5 * decay + (1 - decay)
    dead = size_ref / decay_weight < threshold
    assert float(applied) == 1.0 and int(reseeded) == int(dead.sum()) > 0
    assert torch.allclose(state[3], torch.tensor(decay_weight, device=DEVICE))
    new_size, new_weight, new_book = state[:3]
    torch.testing.assert_close(new_size[~dead], size_ref[~dead])
    torch.testing.assert_close(new_weight[~dead], weight_ref[~dead])
    torch.testing.assert_close(new_book[~dead], book_ref[~dead])
    start = max(threshold, 1.0) * decay_weight
    rows = x.float().movedim(1, -1).reshape(-1, d)
    for code in dead.nonzero().flatten().tolist():  # a row of the batch, at the start size
        assert bool((rows == new_book[code]).all(1).any())
        torch.testing.assert_close(new_size[code], torch.tensor(start, device=DEVICE))
        torch.testing.assert_close(new_weight[code], new_book[code] * start)
    if backend == "triton":  # the Philox key moves on: the next update draws other rows
        assert int(seed) == 8


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_reseed_skips_a_non_finite_batch(backend):
    k, d = 11, 5
    vq = vqfast.VectorQuantizerEMA(k, d, backend=backend, kmeans_init=False,
                                   dead_code_threshold=100.0).to(DEVICE)
    before = {n: t.clone() for n, t in vq.state_dict().items() if isinstance(t, torch.Tensor)}
    x = torch.randn(2, d, 3, device=DEVICE)
    x[0, 0, 0] = float("nan")
    vq(x)
    after = vq.state_dict()
    for name in ("codebook", "ema_weight", "ema_cluster_size", "reseeded_codes"):
        assert torch.equal(after[name], before[name]), name
    assert int(vq.skipped_batches) == 1


def test_eager_calls_skip_the_custom_op_dispatch(monkeypatch):
    """Eagerly, the op's implementation runs directly; traced, the registered op does."""
    from vqfast.ops import vq
    op, calls = vq._nearest_code_op, []
    fn, registered = op.fn, op.op
    monkeypatch.setattr(op, "fn", lambda *a: calls.append("fn") or fn(*a))
    monkeypatch.setattr(op, "op", lambda *a: calls.append("op") or registered(*a))
    x, book = torch.randn(5, 3, requires_grad=True), torch.randn(4, 3)
    idx, sqdist = vqfast.nearest_code(x, book, backend="torch")
    assert calls == ["fn"] and not sqdist.requires_grad  # as the op: outputs carry no graph
    compiled = torch.compile(lambda t: vqfast.nearest_code(t, book, backend="torch")[0],
                             backend="eager", fullgraph=True)
    assert torch.equal(compiled(x.detach()), idx)
    assert "op" in calls[1:] and all(c == "op" for c in calls[1:])


@pytest.mark.slow
def test_host_cost_benchmark_counts_kernels(tmp_path):
    """The benchmark runs (its launches stubbed, so the interpreter must be off), and the
    default EMA step stays within 7 GPU kernels, the learned one within 6."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cases = ["VectorQuantizerEMA (defaults)", "VectorQuantizer (defaults)",
             "original EMA (vqfast.reference)", "MultiScaleResidualVQ (scales 1, 2, 4)",
             "MultiScaleResidualVQ (scales 1, 2, 4), plain torch"]
    subprocess.run([sys.executable, "-m", "benchmarks.host", "--steps", "3", "--out",
                    str(tmp_path), *(a for c in cases for a in ("--case", c))],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    import json
    rows = {r["name"]: r for r in json.loads(next(tmp_path.glob("*.json")).read_text())["results"]}
    assert rows["VectorQuantizerEMA (defaults)"]["kernels"] <= 7
    assert rows["original EMA (vqfast.reference)"]["triton_launches"] == 0
    assert all(r["host_us"] > 0 for r in rows.values())
    # each family beside its algorithm in plain torch; the multi-scale step re-seeds in the
    # EMA update's launch and calls its ops directly (it was 106 kernels)
    multiscale = rows["MultiScaleResidualVQ (scales 1, 2, 4)"]
    plain = rows["MultiScaleResidualVQ (scales 1, 2, 4), plain torch"]
    assert multiscale["kernels"] <= 84 and plain["triton_launches"] == 0
    assert multiscale["vs_plain_torch"] == pytest.approx(plain["host_us"] / multiscale["host_us"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_codebook_gradient_accumulator_zeroed_once_per_backward(backend, deterministic):
    """The learned codebook's gradient is added into a [K, D] zeroed in the forward's
    codebook pass: a second backward (retain_graph) gets the same gradient, not twice it,
    and both equal the original algorithm's."""
    k, d = 13, 6
    vq = vqfast.VectorQuantizer(k, d, backend=backend, **vqfast.ORIGINAL_ALGORITHM).to(DEVICE)
    ref = reference.VectorQuantizer(k, d, 0.25).to(DEVICE)
    ref._embedding.weight.data.copy_(vq.codebook.data)
    x = torch.randn(2, d, 5, device=DEVICE)
    torch.use_deterministic_algorithms(deterministic)
    try:
        loss = vq(x)[0]
        grads = []
        for _ in range(2):
            vq.codebook.grad = None
            loss.backward(retain_graph=True)
            grads.append(vq.codebook.grad.clone())
    finally:
        torch.use_deterministic_algorithms(False)
    ref(x)[0].backward()
    torch.testing.assert_close(grads[0], ref._embedding.weight.grad)
    torch.testing.assert_close(grads[1], grads[0])


def _train(vq, batches, mask):
    torch.manual_seed(1)
    for x in batches:
        loss, q, _, _ = vq(x, mask=torch.ones(x.shape[0], x.shape[2], dtype=torch.bool,
                                              device=x.device) if mask else None)
        (loss + q.sum()).backward()
    return vq.codebook_usage(), {k: v.clone() for k, v in vq.state_dict().items()
                                 if isinstance(v, torch.Tensor)}


def test_learned_codebook_fused_tracking_gives_the_step_by_step_state():
    """Eagerly, a learned codebook re-seeds in one launch and moves its usage EMA in the
    op's own pass; the state equals the step-by-step flow's (taken with an all-True mask),
    between steps too."""
    batches = [torch.randn(2, 6, 9, device=DEVICE) for _ in range(4)]
    runs = []
    for mask in (False, True):
        torch.manual_seed(0)
        vq = vqfast.VectorQuantizer(16, 6, backend="torch", kmeans_init=False,
                                    dead_code_threshold=3.0).to(DEVICE)
        runs.append(_train(vq, batches, mask))
    (usage_a, state_a), (usage_b, state_b) = runs
    assert usage_a.reseeded_codes == usage_b.reseeded_codes > 0
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reseed_codes_and_usage_follow_the_dead_code_rule(backend):
    """The usage EMA moved in the op's pass, then the re-seeding launch, against the rule."""
    from vqfast.ops.vq import quantize, reseed_codes
    k, d, decay, threshold = 21, 5, 0.9, 2.0
    x = torch.randn(2, d, 7, device=DEVICE)
    size = torch.rand(k, device=DEVICE) * 4
    book = torch.randn(k, d, device=DEVICE)
    weight, seed = torch.tensor(0.5, device=DEVICE), torch.tensor([3], device=DEVICE)
    counts = quantize(x, book, 0.25, True, backend=backend,
                      usage=(size_t := size.clone(), weight, seed, decay))[4]
    expected_size = size * decay + (1 - decay) * counts.float()
    torch.testing.assert_close(size_t, expected_size)
    expected_weight = 0.5 * decay + (1 - decay)
    torch.testing.assert_close(weight, torch.tensor(expected_weight, device=DEVICE))
    assert int(seed) == (4 if backend == "triton" else 3)  # the kernels' key moves on
    reseeded = torch.tensor(0, device=DEVICE)
    new_book = book.clone()
    reseed_codes(size_t, weight, new_book, x, seed, reseeded, threshold, backend)
    dead = expected_size / expected_weight < threshold
    assert int(reseeded) == int(dead.sum()) > 0
    torch.testing.assert_close(size_t[~dead], expected_size[~dead])
    torch.testing.assert_close(size_t[dead], torch.full_like(size_t[dead], threshold * expected_weight))
    assert torch.equal(new_book[~dead], book[~dead])
    rows = x.movedim(1, -1).reshape(-1, d)
    assert all(bool((rows == new_book[c]).all(1).any()) for c in dead.nonzero().flatten().tolist())


@pytest.mark.slow
def test_loaded_machine_benchmark_pipeline(monkeypatch):
    """benchmarks.loaded runs quiet and loaded rows (its busy processes gone after), at tiny
    sizes: the pipeline only."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import loaded
    tiny = dict(reference=(lambda: reference.VectorQuantizerEMA(8, 4, 0.25, 0.99), (2, 4, 3), False),
                vqfast=(lambda: vqfast.VectorQuantizerEMA(8, 4, backend="torch"), (2, 4, 3), False))
    monkeypatch.setattr(loaded, "cases", lambda: [("tiny", "reference", tiny)])
    spawned = []
    popen = subprocess.Popen
    monkeypatch.setattr(loaded.subprocess, "Popen",
                        lambda *a, **k: spawned.append(popen(*a, **k)) or spawned[-1])
    rows = loaded.run(threads=(1,), seconds=0.01, progress=lambda *a: None)
    assert [r["loaded"] for r in rows] == [False, True] and len(spawned) == 2
    assert all(p.poll() is not None for p in spawned)  # stopped
    assert all(r["vqfast_speedup"] > 0 for r in rows)
    assert "loaded" in loaded.markdown({"machine": "x", "cores": 2, "torch": "t", "date": "d"}, rows)
