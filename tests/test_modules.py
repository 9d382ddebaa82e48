"""The drop-in modules against the oracle (vqfast.reference), on every backend available."""

import copy

import pytest
import torch

import vqfast
from vqfast import reference
from _util import ORIGINAL, BACKENDS, BACKENDS_BIG, DEVICE, TOL, assert_nearest, same_codes_or_ties, tensor_state

# (B, D, spatial, K): odd shapes, the seed's image shape, every supported rank, K=1.
SHAPES = [
    (3, 37, (333,), 301),        # N = 999, D = 37, K = 301
    (2, 5, (7, 9), 13),
    (1, 3, (2, 3, 5), 7),        # video-like [B, D, T, H, W]
    (4, 8, (3, 3), 1),           # a single code
]
SEED_SHAPE = (256, 64, (8, 8), 512)


def _pair(kind, shape, backend, **kw):
    """An oracle and a vqfast module sharing one initial state (loaded from the oracle's)."""
    _, d, _, k = shape
    if kind == "ema":
        ref = reference.VectorQuantizerEMA(k, d, 0.25, 0.99, 1e-5)
        vq = vqfast.VectorQuantizerEMA(k, d, 0.25, 0.99, 1e-5, backend=backend, **{**ORIGINAL, **kw})
    else:
        ref = reference.VectorQuantizer(k, d, 0.25)
        vq = vqfast.VectorQuantizer(k, d, 0.25, backend=backend, **{**ORIGINAL, **kw})
    if kind != "ema":
        # The seed's uniform(-1/K, 1/K) init puts every code within rounding of every other
        # as seen from an N(0, 1) input, so the nearest code is a coin toss between ties:
        # compare on a spread-out codebook, where the oracle's choice is unambiguous.
        with torch.no_grad():
            ref._embedding.weight.normal_()
    vq.load_state_dict(ref.state_dict())
    return ref.to(DEVICE), vq.to(DEVICE)


def _input(shape, dtype=torch.float32):
    b, d, spatial, _ = shape
    return torch.randn(b, d, *spatial).to(DEVICE, dtype)


def _flat(z):
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def _check_step(ref, vq, z, dtype=torch.float32):
    """One forward + backward of both; compare outputs, loss, perplexity, grads, codebook."""
    tol = TOL[dtype]
    codebook_before = vq.codebook.detach().clone()
    z_ref = z.detach().clone().requires_grad_()
    z_vq = z.detach().clone().requires_grad_()
    loss_r, q_r, perp_r, onehot_r = ref(z_ref)
    loss_v, q_v, perp_v, enc_v = vq(z_vq)

    idx_r = onehot_r.argmax(1)
    idx_v = enc_v.reshape(-1)
    assert enc_v.dtype == torch.int64 and enc_v.shape == (z.shape[0], *z.shape[2:])
    tied = same_codes_or_ties(_flat(z).float(), codebook_before, idx_r, idx_v, dtype)
    assert not bool(tied.any()), "random inputs should not tie"

    assert q_v.dtype == z.dtype and q_v.shape == z.shape
    torch.testing.assert_close(q_v, q_r, **tol)
    torch.testing.assert_close(loss_v, loss_r, **tol)
    torch.testing.assert_close(perp_v, perp_r, **tol)

    # A downstream loss that uses both outputs, so both gradient paths are exercised.
    weight = torch.randn_like(q_r)
    (loss_r + (q_r * weight).sum()).backward()
    (loss_v + (q_v * weight).sum()).backward()
    torch.testing.assert_close(z_vq.grad, z_ref.grad, **tol)
    if isinstance(vq, vqfast.VectorQuantizer):
        torch.testing.assert_close(vq.codebook.grad, ref._embedding.weight.grad, **tol)
        vq.codebook.grad = None
        ref._embedding.weight.grad = None


def _check_ema_state(ref, vq):
    # Unused codes divide a tiny smoothed size: compare relatively.
    torch.testing.assert_close(vq.ema_cluster_size, ref._ema_cluster_size, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vq.ema_weight, ref._ema_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vq.codebook, ref._embedding.weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["plain", "ema"])
def test_matches_oracle(kind, shape, backend):
    ref, vq = _pair(kind, shape, backend)
    for _ in range(3):
        _check_step(ref, vq, _input(shape))
        if kind == "ema":
            _check_ema_state(ref, vq)


@pytest.mark.parametrize("backend", BACKENDS_BIG)
def test_seed_config_ema_ten_steps(backend):
    ref, vq = _pair("ema", SEED_SHAPE, backend)
    for _ in range(10):
        # Encoder-like inputs near the codebook scale keep many codes alive.
        _check_step(ref, vq, _input(SEED_SHAPE))
        _check_ema_state(ref, vq)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["plain", "ema"])
def test_low_precision_inputs(kind, dtype, backend):
    shape = (2, 16, (5, 7), 33)
    ref, vq = _pair(kind, shape, backend)
    z = _input(shape, dtype)
    loss, q, perp, enc = vq(z)
    assert q.dtype == dtype and loss.dtype == torch.float32
    assert vq.codebook.dtype == torch.float32
    if kind == "ema":
        assert vq.ema_weight.dtype == torch.float32 and vq.ema_cluster_size.dtype == torch.float32
    # Codes are nearest to the (upcast) inputs, and the loss is the exact mse to them.
    x32 = _flat(z).float()
    assert_nearest(x32, ref._embedding.weight, enc.reshape(-1), dtype)
    chosen = ref._embedding.weight[enc.reshape(-1)]
    beta = 1.25 if kind == "plain" else 0.25
    torch.testing.assert_close(loss, beta * (chosen - x32).pow(2).mean(), **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_codes_tie_robust(backend):
    k, d = 40, 6
    vq = vqfast.VectorQuantizer(k, d, 0.25, backend=backend, **ORIGINAL).to(DEVICE)
    with torch.no_grad():
        vq.codebook[20:] = vq.codebook[:20]  # every code has an exact twin
        vq.codebook.mul_(50)
    z = torch.randn(3, d, 17, device=DEVICE) * 0.02
    _, q, _, enc = vq(z)
    assert_nearest(_flat(z), vq.codebook.detach(), enc.reshape(-1))
    torch.testing.assert_close(_flat(q), vq.codebook.detach()[enc.reshape(-1)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_onehot_is_the_seeds(backend):
    shape = (2, 4, (3, 5), 9)
    ref, vq = _pair("plain", shape, backend, return_onehot=True)
    z = _input(shape)
    onehot_v = vq(z)[3]
    onehot_r = ref(z)[3]
    assert onehot_v.shape == (30, 9) and onehot_v.dtype == onehot_r.dtype
    torch.testing.assert_close(onehot_v, onehot_r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_code_functional(backend):
    x = torch.randn(101, 19, device=DEVICE)
    codebook = torch.randn(47, 19, device=DEVICE)
    idx, sqdist = vqfast.nearest_code(x, codebook, backend=backend)
    assert_nearest(x, codebook, idx)
    assert sqdist.dtype == torch.float32
    torch.testing.assert_close(sqdist, (x - codebook[idx]).pow(2).sum(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk_rows", [7, 45, 1000])  # inside one element, across, all at once
def test_torch_path_chunks_agree(monkeypatch, chunk_rows):
    """Chunking (over rows of [N, D], or positions and batch elements of [B, D, S]) is
    invisible in every output and gradient."""
    from vqfast import _torch
    ref, _ = _pair("plain", (4, 23, (5, 9), 61), "torch")
    z = torch.randn(4, 23, 5, 9, device=DEVICE)

    def run():
        vq = vqfast.VectorQuantizer(61, 23, 0.25, backend="torch", **ORIGINAL).to(DEVICE)
        vq.load_state_dict(ref.state_dict())
        z_grad = z.clone().requires_grad_()
        loss, q, perplexity, enc = vq(z_grad)
        (loss + q.pow(3).sum()).backward()
        x = z.movedim(1, -1).reshape(-1, 23)
        return [loss, q, perplexity, enc, z_grad.grad, vq.codebook.grad,
                *vqfast.nearest_code(x, vq.codebook.detach(), backend="torch")]

    whole = run()
    monkeypatch.setattr(_torch._common, "_CHUNK_ELEMENTS", 61 * chunk_rows)
    for a, b in zip(run(), whole):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_and_no_grad_leave_ema_state(backend):
    vq = vqfast.VectorQuantizerEMA(16, 4, 0.25, backend=backend, **ORIGINAL).to(DEVICE)
    state = copy.deepcopy(vq.state_dict())
    vq.eval()
    vq(torch.randn(2, 4, 3, 3, device=DEVICE))
    with torch.no_grad():
        loss, q, perp, enc = vq(torch.randn(2, 4, 3, 3, device=DEVICE))
    assert not q.requires_grad
    for key, value in tensor_state(vq).items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    vq.train()
    with torch.no_grad():  # training mode updates the EMA even without autograd
        vq(torch.randn(2, 4, 3, 3, device=DEVICE))
    assert not torch.equal(vq.ema_cluster_size, state["ema_cluster_size"])


def test_codebook_kinds_and_state_dict_round_trip():
    plain = vqfast.VectorQuantizer(10, 3, 0.25, **ORIGINAL)
    ema = vqfast.VectorQuantizerEMA(10, 3, 0.25, **ORIGINAL)
    assert isinstance(plain.codebook, torch.nn.Parameter)
    assert [n for n, _ in ema.named_parameters()] == []
    assert set(ema.state_dict()) == {"codebook", "ema_cluster_size", "ema_weight", "_extra_state",
                                     "ema_decay_weight", "reseeded_codes", "skipped_batches"}
    assert plain.codebook.abs().max() <= 1 / 10
    for module, cls in ((plain, vqfast.VectorQuantizer), (ema, vqfast.VectorQuantizerEMA)):
        twin = cls(10, 3, 0.25)
        twin.load_state_dict(module.state_dict())
        for key, value in tensor_state(module).items():
            assert torch.equal(twin.state_dict()[key], value)


def test_loads_seed_state_dict_keys():
    ref = reference.VectorQuantizerEMA(12, 5, 0.25, 0.99)
    ref.train()
    ref(torch.randn(2, 5, 4, 4))  # non-trivial EMA state
    assert set(ref.state_dict()) == {"_embedding.weight", "_ema_w", "_ema_cluster_size"}
    vq = vqfast.VectorQuantizerEMA(12, 5, 0.25, 0.99, **ORIGINAL)
    vq.load_state_dict(ref.state_dict())
    assert torch.equal(vq.codebook, ref._embedding.weight)
    assert torch.equal(vq.ema_weight, ref._ema_w)
    assert torch.equal(vq.ema_cluster_size, ref._ema_cluster_size)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        vq.load_state_dict({**ref.state_dict(), "_bogus": torch.zeros(1)})


def test_to_device_moves_state():
    vq = vqfast.VectorQuantizerEMA(8, 3, 0.25, **ORIGINAL).to("meta")
    assert vq.codebook.device.type == "meta" and vq.ema_weight.device.type == "meta"


def _bad_inputs():
    return [
        ("channels", torch.randn(2, 5, 4, 4), ValueError, "channels"),
        ("rank", torch.randn(2, 4), ValueError, "spatial"),
        ("int", torch.randint(0, 3, (2, 4, 3, 3)), TypeError, "fp32, fp16 or bf16"),
        ("complex", torch.randn(2, 4, 3, 3, dtype=torch.complex64), TypeError, "fp32, fp16 or bf16"),
        ("float64", torch.randn(2, 4, 3, 3, dtype=torch.float64), TypeError, "fp32, fp16 or bf16"),
        ("device", torch.randn(2, 4, 3, 3, device="meta"), ValueError, "device|meta"),
        ("empty", torch.randn(0, 4, 3, 3), ValueError, "empty"),
        ("not a tensor", [[1.0]], TypeError, "Tensor"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
@pytest.mark.parametrize("kind", ["plain", "ema"])
def test_bad_input_raises_and_keeps_state(kind, case):
    _, z, error, message = case
    vq = (vqfast.VectorQuantizerEMA if kind == "ema" else vqfast.VectorQuantizer)(16, 4, 0.25)
    state = copy.deepcopy(vq.state_dict())
    with pytest.raises(error, match=message):
        vq(z)
    for key, value in tensor_state(vq).items():
        assert torch.equal(value, state[key])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e19])  # 3e19: finite, squares overflow
def test_non_finite_batch_is_skipped_and_counted(bad, backend):
    vq = vqfast.VectorQuantizerEMA(16, 4, 0.25, backend=backend, **ORIGINAL).to(DEVICE)
    state = copy.deepcopy(vq.state_dict())
    z = torch.randn(2, 4, 3, 3, device=DEVICE)
    z[1, 2, 0, 1] = bad
    vq(z)
    for key, value in tensor_state(vq).items():
        if key != "skipped_batches":
            assert torch.equal(value, state[key]), key
    assert int(vq.skipped_batches) == 1
    with pytest.warns(RuntimeWarning, match="1 training batch"):
        assert vq.codebook_usage().skipped_batches == 1
    vq.eval()  # inference does not touch state, so it only propagates the value
    vq(z)
    assert all(bool(torch.isfinite(v).all()) for v in tensor_state(vq).values())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_check_finite_raises_before_any_state_changes(backend):
    """The opt-in strict mode (k-means input is always checked: tests/test_hardening.py)."""
    vq = vqfast.VectorQuantizerEMA(16, 4, 0.25, backend=backend, check_finite=True, **ORIGINAL).to(DEVICE)
    state = copy.deepcopy(vq.state_dict())
    z = torch.randn(2, 4, 3, 3, device=DEVICE)
    z[0, 1, 2, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        vq(z)
    assert all(torch.equal(value, state[key]) for key, value in tensor_state(vq).items())


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="backend"):
        vqfast.VectorQuantizer(4, 2, 0.25, backend="cuda", **ORIGINAL)
    with pytest.raises(ValueError, match="decay"):
        vqfast.VectorQuantizerEMA(4, 2, 0.25, decay=1.5, **ORIGINAL)
    with pytest.raises(ValueError, match=">= 1"):
        vqfast.VectorQuantizer(0, 2, 0.25, **ORIGINAL)


def test_nearest_code_bad_input():
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        vqfast.nearest_code(torch.randn(2, 3, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="channels"):
        vqfast.nearest_code(torch.randn(2, 3), torch.randn(5, 4))


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        vqfast.nearest_code(torch.randn(4, 3), torch.randn(5, 3), backend="triton")


def test_codebook_dim_projections_of_an_empty_sequence():
    """``codebook_dim``'s projections are 1x1 convolutions: an empty sequence ([B, D, 0])
    gives an empty result, as a matmul would, not a convolution's size error."""
    codes = torch.zeros(2, 0, dtype=torch.long)
    assert vqfast.FSQ((5, 5), dim=4, backend="torch").decode_indices(codes).shape == (2, 4, 0)
    projection = vqfast.modules.Projection(4, 3)
    assert projection(torch.randn(2, 4, 0)).shape == (2, 3, 0)
