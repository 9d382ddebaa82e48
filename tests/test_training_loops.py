"""What users' training loops need (issue 21): frozen codebooks and an encode-only path."""

import pytest
import torch

import vqfast
from _util import BACKENDS, DEVICE, TOL, tensor_state

QUANTIZERS = {
    "plain": lambda b, **kw: vqfast.VectorQuantizer(13, 6, 0.25, backend=b, **kw),
    "ema": lambda b, **kw: vqfast.VectorQuantizerEMA(13, 6, 0.25, backend=b, **kw),
    "ema+kmeans+dead": lambda b, **kw: vqfast.VectorQuantizerEMA(
        13, 6, 0.25, kmeans_init=True, dead_code_threshold=1.0, backend=b, **kw),
    "cosine+codebook_dim": lambda b, **kw: vqfast.VectorQuantizerEMA(
        13, 6, 0.25, cosine=True, codebook_dim=4, backend=b, **kw),
    "residual-ema": lambda b, **kw: vqfast.ResidualVQ(3, 13, 6, backend=b, **kw),
    "residual-learned+kmeans": lambda b, **kw: vqfast.ResidualVQ(
        2, 13, 6, ema=False, kmeans_init=True, backend=b, **kw),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", QUANTIZERS)
def test_frozen_codebook_stays_bit_identical(name, backend):
    torch.manual_seed(0)
    vq = QUANTIZERS[name](backend, freeze_codebook=True).to(DEVICE)
    codebook_names = [n for n, _ in vq.named_parameters() if "codebook" in n]
    optimizer = torch.optim.SGD(vq.parameters(), lr=0.1) if list(vq.parameters()) else None
    before = {k: v.clone() for k, v in tensor_state(vq).items() if "project" not in k}
    for _ in range(3):
        z = torch.randn(2, 6, 5, device=DEVICE, requires_grad=True)
        loss, quantized, _, _ = vq(z)
        (loss + quantized.square().mean()).backward()
        assert z.grad is not None and bool(torch.isfinite(z.grad).all()) and z.grad.abs().sum() > 0
        assert bool(torch.isfinite(loss)) and float(loss.detach()) > 0
        for n in codebook_names:
            assert dict(vq.named_parameters())[n].grad is None, n
        if optimizer:
            optimizer.step()
            optimizer.zero_grad()
    for key, value in tensor_state(vq).items():
        if key in before:
            assert torch.equal(value, before[key]), key


def test_freezing_is_an_attribute_and_the_loss_keeps_its_value():
    torch.manual_seed(0)
    vq = vqfast.VectorQuantizer(13, 6, 0.25, backend="torch")
    z = torch.randn(2, 6, 5)
    live = vq(z)[0]
    vq.freeze_codebook = True
    frozen = vq(z)[0]
    assert torch.equal(live.detach(), frozen.detach())
    ema = vqfast.VectorQuantizerEMA(13, 6, 0.25, backend="torch")
    ema.freeze_codebook = True
    before = ema.codebook.clone()
    ema(z)
    assert torch.equal(ema.codebook, before)


ENCODERS = {
    **{k: v for k, v in QUANTIZERS.items()},
    "masked": lambda b: vqfast.VectorQuantizerEMA(13, 6, 0.25, backend=b),
    "rotation": lambda b: vqfast.VectorQuantizer(13, 6, 0.25, rotation_trick=True, backend=b),
    "grouped-shared": lambda b: vqfast.ResidualVQ(2, 13, 6, groups=2, shared_codebook=True, backend=b),
    "fsq": lambda b: vqfast.FSQ([5, 4, 3, 3, 2, 2], backend=b),
    "lfq": lambda b: vqfast.LFQ(6, backend=b),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ENCODERS)
def test_decode_of_encode_is_the_eval_output(name, backend, dtype):
    torch.manual_seed(1)
    vq = ENCODERS[name](backend).to(DEVICE).eval()
    z = torch.randn(2, 6, 3, 5, device=DEVICE).to(dtype)
    mask = None
    if name == "masked":
        mask = torch.rand(2, 3, 5, device=DEVICE) > 0.3
    with torch.inference_mode():
        codes = vq.encode(z, mask=mask) if mask is not None else vq.encode(z)
        out = vq(z, mask=mask) if mask is not None else vq(z)
    quantized, forward_codes = (out[0], out[1]) if name == "fsq" else (out[1], out[3])
    assert torch.equal(codes, forward_codes)
    decoded = vq.decode_indices(codes)
    if mask is not None:  # masked positions give back their input
        decoded = torch.where(mask[:, None], decoded, z.float())
    # The same codes give the same values; only a 16-bit store may differ by one ulp (the
    # Triton path rounds its fp32 gather in the kernel, decode_indices with torch).
    ulp = {torch.float32: 0.0, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    tol = dict(rtol=ulp, atol=ulp) if backend == "triton" else dict(rtol=0.0, atol=0.0)
    if getattr(vq, "project_out", None) is not None and dtype != torch.float32:
        tol = TOL[dtype]  # the forward projects back in the input's dtype, decode in fp32
    torch.testing.assert_close(decoded.to(dtype), quantized, **tol)


def test_encode_changes_no_state_in_training_mode():
    vq = vqfast.VectorQuantizerEMA(13, 6, 0.25, kmeans_init=True, backend="torch")
    before = {k: v.clone() for k, v in tensor_state(vq).items()}
    vq.encode(torch.randn(2, 6, 5))
    for key, value in tensor_state(vq).items():
        assert torch.equal(value, before[key]), key
