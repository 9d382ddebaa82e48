"""Property tests (hypothesis): drawn shapes, dtypes, layouts, scales and options, both
backends against ``vqfast.reference`` and against each other, and state left untouched
by every rejected input. Bounded examples, derandomized (a fixed seed): minutes, not hours.
"""

import copy

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import vqfast
from vqfast import reference
from _util import ORIGINAL, BACKENDS, DEVICE, TOL, assert_nearest, same_codes_or_ties, tensor_state

pytestmark = pytest.mark.slow

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def cases(draw, max_n=300, dtypes=tuple(DTYPES)):
    """A channels-first input ``[B, D, *spatial]`` (ranks 1-3), its codebook size, a layout
    and a value scale."""
    rank = draw(st.integers(1, 3))
    d = draw(st.integers(1, 130))
    k = draw(st.integers(1, 1000))
    b = draw(st.integers(1, 3))
    spatial = draw(st.lists(st.integers(1, 7), min_size=rank, max_size=rank))
    n = b
    for extent in spatial:
        n *= extent
    assume(n <= max_n)
    return dict(b=b, d=d, k=k, spatial=spatial, dtype=draw(st.sampled_from(dtypes)),
                layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
                scale=draw(st.sampled_from([1e-2, 1.0, 30.0])), seed=draw(st.integers(0, 2**16)))


def _input(case):
    g = torch.Generator().manual_seed(case["seed"])
    shape = (case["b"], case["d"], *case["spatial"])
    x = torch.randn(shape, generator=g) * case["scale"]
    if case["layout"] == "channels_last":  # same values, D innermost in memory
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    elif case["layout"] == "strided":  # every other element of a wider tensor
        wide = torch.zeros(*shape[:-1], 2 * shape[-1])
        wide[..., ::2] = x
        x = wide[..., ::2]
    return x.to(DEVICE, case["dtype"])


def _flat(z):
    return z.detach().float().movedim(1, -1).reshape(-1, z.shape[1])


def _spread_codebook(case):
    g = torch.Generator().manual_seed(case["seed"] + 1)
    return (torch.randn(case["k"], case["d"], generator=g) * case["scale"]).to(DEVICE)


@SETTINGS
@given(case=cases(), backend=st.sampled_from(BACKENDS))
def test_plain_quantizer_forward_and_gradients(case, backend):
    vq = vqfast.VectorQuantizer(case["k"], case["d"], 0.25, backend=backend, **ORIGINAL).to(DEVICE)
    with torch.no_grad():
        vq.codebook.copy_(_spread_codebook(case))
    z = _input(case).requires_grad_()
    loss, q, perplexity, codes = vq(z)
    x, codebook, idx = _flat(z), vq.codebook.detach(), codes.reshape(-1)
    assert codes.shape == (case["b"], *case["spatial"]) and q.dtype == z.dtype
    assert_nearest(x, codebook, idx, case["dtype"])
    chosen = codebook[idx]
    # (the Triton interpreter rounds fp32 -> bf16 toward zero, the GPU to nearest: one ulp)
    ulp = 2**-7 if case["dtype"] == torch.bfloat16 else 0.0
    torch.testing.assert_close(_flat(q), chosen.to(case["dtype"]).float(), rtol=ulp, atol=0)
    expected_loss = 1.25 * (chosen - x).pow(2).mean()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-4, atol=1e-6 * case["scale"] ** 2)
    weight = torch.randn_like(q)
    (loss + (q * weight).float().sum()).backward()
    # d/dx: straight-through weight + the commitment term; d/de: the codebook loss's scatter.
    expected_x = _flat(weight) + 0.25 * 2 * (x - chosen) / x.numel()
    tol = TOL[case["dtype"]]
    torch.testing.assert_close(_flat(z.grad), expected_x.to(case["dtype"]).float(),
                               rtol=tol["rtol"], atol=tol["atol"] * max(1.0, case["scale"]))
    expected_e = torch.zeros_like(codebook).index_add_(0, idx, 2 * (chosen - x) / x.numel())
    torch.testing.assert_close(vq.codebook.grad, expected_e, rtol=1e-4,
                               atol=1e-6 * max(1.0, case["scale"]))
    assert float(perplexity) == pytest.approx(float(vqfast.functional.perplexity(
        torch.bincount(idx, minlength=case["k"]))), rel=1e-5)


@SETTINGS
@given(case=cases(max_n=200, dtypes=(torch.float32,)), backend=st.sampled_from(BACKENDS),
       steps=st.integers(1, 3))
def test_ema_state_follows_the_oracle(case, backend, steps):
    """fp32 only: the oracle computes in fp32, so compare like with like."""
    ref = reference.VectorQuantizerEMA(case["k"], case["d"], 0.25, 0.9).to(DEVICE)
    vq = vqfast.VectorQuantizerEMA(case["k"], case["d"], 0.25, 0.9, backend=backend, **ORIGINAL).to(DEVICE)
    with torch.no_grad():
        ref._embedding.weight.copy_(_spread_codebook(case))
    vq.load_state_dict(ref.state_dict())
    for step in range(steps):
        z = _input(dict(case, seed=case["seed"] + step))
        codebook = vq.codebook.clone()
        loss_r, q_r, _, onehot = ref(z)
        loss_v, q_v, _, codes = vq(z)
        tied = same_codes_or_ties(_flat(z), codebook, onehot.argmax(1), codes.reshape(-1))
        assume(not bool(tied.any()))  # a tie sends the two EMA states down different paths
        torch.testing.assert_close(q_v, q_r, rtol=1e-5, atol=1e-5 * case["scale"])
        torch.testing.assert_close(loss_v, loss_r, rtol=1e-4, atol=1e-6 * case["scale"] ** 2)
    torch.testing.assert_close(vq.ema_cluster_size, ref._ema_cluster_size, rtol=1e-4, atol=1e-6)
    scale = max(1.0, case["scale"])
    torch.testing.assert_close(vq.ema_weight, ref._ema_w, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(vq.codebook, ref._embedding.weight, rtol=1e-4, atol=1e-4 * scale)


@SETTINGS
@given(case=cases(max_n=200))
def test_backends_agree(case):
    assume("triton" in BACKENDS)
    codebook = _spread_codebook(case)
    x = _flat(_input(case)).to(case["dtype"])
    idx_t, dist_t = vqfast.nearest_code(x, codebook, backend="torch")
    idx_k, dist_k = vqfast.nearest_code(x, codebook, backend="triton")
    same_codes_or_ties(x.float(), codebook, idx_t, idx_k, case["dtype"])
    tol = TOL[case["dtype"]]
    torch.testing.assert_close(dist_k, dist_t, rtol=tol["rtol"] * 10,
                               atol=tol["atol"] * case["scale"] ** 2 * case["d"])


def _bad_inputs(d):
    return [
        ("channels", torch.randn(2, d + 1, 3), ValueError),
        ("rank", torch.randn(2, d), ValueError),
        ("float64", torch.randn(2, d, 3, dtype=torch.float64), TypeError),
        ("int", torch.zeros(2, d, 3, dtype=torch.int32), TypeError),
        ("empty", torch.randn(0, d, 3), ValueError),
    ]


@SETTINGS
@given(d=st.integers(1, 40), k=st.integers(1, 50), which=st.integers(0, 4),
       kind=st.sampled_from(["plain", "ema"]), kmeans=st.booleans(),
       backend=st.sampled_from(BACKENDS))
def test_rejected_inputs_leave_state_untouched(d, k, which, kind, kmeans, backend):
    cls = vqfast.VectorQuantizerEMA if kind == "ema" else vqfast.VectorQuantizer
    vq = cls(k, d, 0.25, backend=backend, kmeans_init=kmeans).to(DEVICE)
    state = copy.deepcopy(vq.state_dict())
    _, z, error = _bad_inputs(d)[which]
    with pytest.raises(error):
        vq(z.to(DEVICE))
    for key, value in tensor_state(vq).items():
        assert torch.equal(value, state[key]), key
