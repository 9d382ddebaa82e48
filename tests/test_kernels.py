"""The Triton launchers against the oracle: interpreted on CPU, compiled on CUDA.

Shapes are small and odd (N, K, D not multiples of any block; K=1; N below one block;
D=3; D above one channel block) because the interpreter is slow.
"""

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import vqfast  # noqa: E402
from vqfast import kernels, reference  # noqa: E402
from vqfast.kernels.nearest_code import tf32_split  # noqa: E402
from _util import ORIGINAL, DEVICE, INTERPRETED, INTERPRETER_BROKEN, TIE_EPS, assert_nearest, tensor_state  # noqa: E402

pytestmark = [pytest.mark.kernels,
              pytest.mark.skipif(INTERPRETER_BROKEN is not None, reason=str(INTERPRETER_BROKEN))]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, K, D)
SHAPES = [(1, 1, 3), (5, 1, 3), (63, 65, 17), (130, 257, 130), (97, 33, 64)]
# The contract's extremes: D up to 1024 and K up to 65536 (tiny N: the interpreter is slow).
WIDE_SHAPES = [(3, 5, 1030), (2, 70_001, 3)]


def _data(n, k, d, dtype):
    x = torch.randn(n, d, device=DEVICE).to(dtype)
    codebook = torch.randn(k, d, device=DEVICE)
    return x, codebook


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + WIDE_SHAPES, ids=str)
def test_nearest_code(shape, dtype):
    x, codebook = _data(*shape, dtype)
    idx, sqdist = kernels.nearest_code(x, codebook)
    # Codes are compared to the codebook as the dot sees it (rounded to x's dtype).
    seen = codebook.to(dtype).float()
    assert_nearest(x.float(), seen, idx, dtype)
    exact = (x.float() - seen[idx]).pow(2).sum(1)
    scale = x.float().pow(2).sum(1) + seen.pow(2).sum(1).max()
    assert bool(((sqdist - exact).abs() <= TIE_EPS[dtype] * scale + 1e-4).all())
    if dtype == torch.float32:  # no ties here: the oracle's index exactly
        assert torch.equal(idx, reference.nearest_code(x, codebook))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [200, 256])  # (256: whole tiles only, the last one peeled)
def test_nearest_code_ties_pick_lowest_index_across_tiles(k, dtype):
    """Exact duplicates in different K tiles: the lowest index wins, as with torch.argmin
    (16-bit x: the x-resident search, its tiles pipelined by hand)."""
    d = 9
    codebook = torch.randn(k, d, device=DEVICE)
    codebook[k - 70:] = codebook[:70]  # code j and j + k - 70 are twins, >= one tile apart
    x = (codebook[torch.arange(70, device=DEVICE)] + 1e-3 * torch.randn(70, d, device=DEVICE)).to(dtype)
    idx, _ = kernels.nearest_code(x, codebook)
    assert torch.equal(idx, reference.nearest_code(x.float(), codebook.to(dtype).float()))
    assert int(idx.max()) < 70


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32"])
def test_nearest_code_precisions(precision):
    x, codebook = _data(45, 70, 20, torch.float32)
    idx, _ = vqfast.nearest_code(x, codebook, backend="triton", precision=precision)
    assert_nearest(x, codebook, idx, torch.float32 if precision != "tf32" else torch.bfloat16)


@triton.jit
def _tf32_split_kernel(v_ptr, hi_ptr, lo_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    hi, lo = tf32_split(tl.load(v_ptr + offs))
    tl.store(hi_ptr + offs, hi)
    tl.store(lo_ptr + offs, lo)


def test_tf32_split_is_exact_and_rounds_to_nearest():
    """The tf32x3 search's operand split: hi a tf32 value (13 low mantissa bits clear), the
    tf32 nearest to v (|lo| at most half a tf32 step), hi + lo == v exactly; an infinity,
    a NaN or fp32's largest value (which rounds past it) keeps itself as hi and 0 as lo."""
    v = torch.cat([torch.randn(249, device=DEVICE) * 10.0 ** torch.randint(-20, 20, (249,), device=DEVICE),
                   torch.tensor([1 + 2.0 ** -11, 1 + 3 * 2.0 ** -12, 0.0, -0.0, float("inf"),
                                 float("-inf"), torch.finfo(torch.float32).max], device=DEVICE)])
    v = torch.cat([v, torch.full((256 - v.numel(),), float("nan"), device=DEVICE)])
    hi, lo = torch.empty_like(v), torch.empty_like(v)
    _tf32_split_kernel[(1,)](v, hi, lo, N=256)
    largest = v == torch.finfo(torch.float32).max
    assert hi[largest].item() == v[largest].item() and lo[largest].item() == 0
    finite = v.isfinite() & ~largest
    assert bool((hi[finite].view(torch.int32) & 0x1FFF == 0).all())
    assert torch.equal(hi[finite] + lo[finite], v[finite])
    step = (hi[finite].abs().view(torch.int32) >> 23).sub(127 + 10).float().exp2()
    assert bool((lo[finite].abs() <= step / 2).all())
    assert hi[249].item() == 1 + 2.0 ** -10 and hi[250].item() == 1 + 2.0 ** -10  # ties away
    assert torch.equal(hi[~finite & ~v.isnan()], v[~finite & ~v.isnan()])
    assert bool(hi[v.isnan()].isnan().all()) and bool((lo[~finite] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nearest_code_nan_rows_stay_in_range(dtype):
    x, codebook = _data(20, 30, 5, dtype)
    x[3, 2] = float("nan")
    idx, sqdist = kernels.nearest_code(x, codebook)
    assert int(idx.min()) >= 0 and int(idx.max()) < 30
    assert bool(sqdist[3].isnan()) and bool(sqdist.isfinite().sum() == 19)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gather_loss(shape, dtype):
    n, k, d = shape
    x, codebook = _data(n, k, d, dtype)
    idx = torch.randint(0, k, (n,), device=DEVICE)
    q, loss, perplexity, counts, code_sums = kernels.gather_loss(x, codebook, idx, True, 0.3)
    assert q.dtype == dtype
    if dtype == torch.bfloat16 and INTERPRETED:
        # The interpreter (triton 3.8) truncates fp32 -> bf16 where the GPU rounds to
        # nearest even: allow one bf16 ulp there, exact everywhere else.
        torch.testing.assert_close(q.float(), codebook[idx], rtol=2**-7, atol=0)
    else:
        assert torch.equal(q, codebook[idx].to(dtype))
    torch.testing.assert_close(loss, 0.3 * (codebook[idx] - x.float()).pow(2).sum(), rtol=1e-5,
                               atol=1e-5)
    assert counts.dtype == torch.int32 and torch.equal(counts.long(), torch.bincount(idx, minlength=k))
    probs = torch.bincount(idx, minlength=k).float() / n  # the original's perplexity
    torch.testing.assert_close(perplexity, torch.exp(-(probs * torch.log(probs + 1e-10)).sum()))
    onehot = torch.nn.functional.one_hot(idx, k).float()  # the oracle's dense EMA sums
    torch.testing.assert_close(code_sums, onehot.t() @ x.float(), rtol=1e-5, atol=1e-5)
    assert kernels.gather_loss(x, codebook, idx, False)[4] is None


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def _training_run(kind):
    torch.manual_seed(1)
    cls = vqfast.VectorQuantizerEMA if kind == "ema" else vqfast.VectorQuantizer
    vq = cls(37, 11, 0.25, backend="triton").to(DEVICE)
    z = torch.randn(3, 11, 13, 9, device=DEVICE, requires_grad=True)
    for _ in range(2):
        loss, q, _, _ = vq(z)
        (loss + q.pow(2).sum()).backward()
    grads = [z.grad] + ([vq.codebook.grad] if kind == "plain" else [])
    return [t.clone() for t in grads] + [t.clone() for t in tensor_state(vq).values()]


@pytest.mark.parametrize("kind", ["plain", "ema"])
def test_deterministic_mode_is_bitwise_reproducible(kind, deterministic):
    first, second = _training_run(kind), _training_run(kind)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["plain", "ema"])
def test_deterministic_path_matches_atomic_path(kind):
    atomic = _training_run(kind)
    torch.use_deterministic_algorithms(True)
    try:
        sorted_ = _training_run(kind)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(atomic, sorted_):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_launchers_reject_bad_tensors():
    x, codebook = _data(8, 4, 6, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.nearest_code(x.t().contiguous().t(), codebook)
    with pytest.raises(TypeError, match="float"):
        kernels.nearest_code(x.double(), codebook)
    with pytest.raises(ValueError, match="D="):
        kernels.nearest_code(x, codebook[:, :5].contiguous())
    with pytest.raises(ValueError, match="idx"):
        kernels.gather_loss(x, codebook, torch.zeros(8, dtype=torch.int32, device=DEVICE), False)


@pytest.mark.skipif(INTERPRETED, reason="needs a CUDA device")
def test_large_shape_allocates_no_n_by_k():
    n, k, d = 65536, 16384, 256
    vq = vqfast.VectorQuantizerEMA(k, d, 0.25, **ORIGINAL).to(DEVICE)
    z = torch.randn(n // 64, d, 8, 8, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss, q, _, _ = vq(z)
    (loss + q.float().mean()).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < n * k * 4 // 8, f"{extra / 2**20:.0f} MiB extra: an [N, K] buffer is {n * k * 4 / 2**20:.0f} MiB"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_first_layout_matches_rows(dtype):
    """[B, D, S] inputs are read and written in place, as their [B * S, D] rows would be."""
    b, d, s, k = 3, 19, 45, 37
    x3 = torch.randn(b, d, s, device=DEVICE).to(dtype)
    rows = x3.movedim(1, -1).reshape(-1, d).contiguous()
    codebook = torch.randn(k, d, device=DEVICE)
    idx3, sqdist3 = kernels.nearest_code(x3, codebook)
    idx2, sqdist2 = kernels.nearest_code(rows, codebook)
    assert torch.equal(idx3, idx2) and torch.equal(sqdist3, sqdist2)
    q3, err3, _, counts3, sums3 = kernels.gather_loss(x3, codebook, idx3, True)
    q2, err2, _, counts2, sums2 = kernels.gather_loss(rows, codebook, idx2, True)
    assert q3.shape == x3.shape and torch.equal(q3.movedim(1, -1).reshape(-1, d), q2)
    torch.testing.assert_close(err3, err2)
    assert torch.equal(counts3, counts2)
    torch.testing.assert_close(sums3, sums2)
    grad3 = torch.randn_like(x3)
    g = torch.tensor(0.7, device=DEVICE)
    gx3, gc3 = kernels.quantize_backward(grad3, g, x3, codebook, idx3, 0.1, 0.2)
    gx2, gc2 = kernels.quantize_backward(grad3.movedim(1, -1).reshape(-1, d).contiguous(), g, rows,
                                         codebook, idx2, 0.1, 0.2)
    assert torch.equal(gx3.movedim(1, -1).reshape(-1, d), gx2)
    torch.testing.assert_close(gc3, gc2)
