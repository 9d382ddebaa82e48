"""What users' training loops need (issue 21): frozen codebooks and an encode-only path."""

import pytest
import torch

import vqfast
from _util import ORIGINAL, BACKENDS, DEVICE, TOL, tensor_state

QUANTIZERS = {
    "plain": lambda b, **kw: vqfast.VectorQuantizer(13, 6, 0.25, backend=b, **{**ORIGINAL, **kw}),
    "ema": lambda b, **kw: vqfast.VectorQuantizerEMA(13, 6, 0.25, backend=b, **{**ORIGINAL, **kw}),
    "ema+kmeans+dead": lambda b, **kw: vqfast.VectorQuantizerEMA(
        13, 6, 0.25, kmeans_init=True, dead_code_threshold=1.0, backend=b, **kw),
    "cosine+codebook_dim": lambda b, **kw: vqfast.VectorQuantizerEMA(
        13, 6, 0.25, cosine=True, codebook_dim=4, backend=b, **{**ORIGINAL, **kw}),
    "residual-ema": lambda b, **kw: vqfast.ResidualVQ(3, 13, 6, backend=b, **{**ORIGINAL, **kw}),
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
    vq = vqfast.VectorQuantizer(13, 6, 0.25, backend="torch", **ORIGINAL)
    z = torch.randn(2, 6, 5)
    live = vq(z)[0]
    vq.freeze_codebook = True
    frozen = vq(z)[0]
    assert torch.equal(live.detach(), frozen.detach())
    ema = vqfast.VectorQuantizerEMA(13, 6, 0.25, backend="torch", **ORIGINAL)
    ema.freeze_codebook = True
    before = ema.codebook.clone()
    ema(z)
    assert torch.equal(ema.codebook, before)


ENCODERS = {
    **{k: v for k, v in QUANTIZERS.items()},
    "masked": lambda b: vqfast.VectorQuantizerEMA(13, 6, 0.25, backend=b, **ORIGINAL),
    "rotation": lambda b: vqfast.VectorQuantizer(13, 6, 0.25, rotation_trick=True, backend=b, **ORIGINAL),
    "grouped-shared": lambda b: vqfast.ResidualVQ(2, 13, 6, groups=2, shared_codebook=True, backend=b, **ORIGINAL),
    "fsq": lambda b: vqfast.FSQ([5, 4, 3, 3, 2, 2], backend=b),
    "lfq": lambda b: vqfast.LFQ(6, backend=b),
    "residual-fsq": lambda b: vqfast.ResidualFSQ([5, 4, 3], 3, groups=2, backend=b),
    "residual-lfq": lambda b: vqfast.ResidualLFQ(6, 3, groups=2, backend=b),
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
    quantized, forward_codes = (out[0], out[1]) if name.endswith("fsq") else (out[1], out[3])
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


# --- gradient accumulation ------------------------------------------------------------

ACCUMULATING = {
    "ema": lambda b: vqfast.VectorQuantizerEMA(13, 6, 0.25, backend=b, **ORIGINAL),
    "residual": lambda b: vqfast.ResidualVQ(3, 13, 6, groups=2, backend=b, **ORIGINAL),
    "residual+shared": lambda b: vqfast.ResidualVQ(2, 13, 6, shared_codebook=True, backend=b,
                                                   **ORIGINAL),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", ACCUMULATING)
def test_accumulated_micro_batches_equal_one_concatenated_batch(kind, backend, masked):
    torch.manual_seed(0)
    micro = [torch.randn(2, 6, 7, device=DEVICE) for _ in range(3)]
    masks = [torch.rand(2, 7, device=DEVICE) > 0.3 if masked else None for _ in micro]
    accumulated = ACCUMULATING[kind](backend).to(DEVICE)
    whole = ACCUMULATING[kind](backend).to(DEVICE)
    whole.load_state_dict(accumulated.state_dict())
    for _ in range(2):  # two optimizer steps of three micro-batches each
        with accumulated.accumulate():
            for z, mask in zip(micro, masks):
                accumulated(z, mask=mask)
                assert torch.equal(accumulated.ema_decay_weight, whole.ema_decay_weight)  # not yet
        whole(torch.cat(micro), mask=torch.cat(masks) if masked else None)
        for key, value in tensor_state(whole).items():
            torch.testing.assert_close(tensor_state(accumulated)[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["ema", "residual+dropout"])
def test_accumulate_with_kmeans_and_dead_codes_trains(kind):
    vq = (vqfast.VectorQuantizerEMA(13, 6, 0.25, dead_code_threshold=3.0, backend="torch")
          if kind == "ema" else
          vqfast.ResidualVQ(3, 13, 6, quantize_dropout=True, dead_code_threshold=3.0,
                            backend="torch"))
    for step in range(4):
        with vq.accumulate():
            for _ in range(2):
                vq(torch.randn(2, 6, 9) + step)  # drifting: codes die and are re-seeded
    codebook = vq.codebook if kind == "ema" else vq.codebooks
    assert bool(vq.initialized) and bool(torch.isfinite(codebook).all())
    assert bool((vq.ema_decay_weight > 0).all()) and int(vq.reseeded_codes.sum()) > 0


def test_accumulate_does_not_nest_and_an_error_leaves_state():
    vq = vqfast.VectorQuantizerEMA(13, 6, 0.25, backend="torch", **ORIGINAL)
    before = {k: v.clone() for k, v in tensor_state(vq).items()}
    with pytest.raises(RuntimeError, match="do not nest"):
        with vq.accumulate():
            with vq.accumulate():
                pass
    with pytest.raises(KeyError):
        with vq.accumulate():
            vq(torch.randn(2, 6, 4))
            raise KeyError("a failing training step")
    for key, value in tensor_state(vq).items():
        assert torch.equal(value, before[key]), key
    assert vq._accumulated is None


def test_accumulation_all_reduces_once_per_update(monkeypatch):
    import os
    import socket

    import torch.distributed as dist
    from vqfast import quantizer_base
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        monkeypatch.setattr(quantizer_base, "_world_size", lambda: 2)
        calls = []
        original = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (calls.append(t.numel()),
                                                                    original(t, *a, **k))[1])
        for vq in (vqfast.VectorQuantizerEMA(13, 6, 0.25, backend="torch", **ORIGINAL),
                   vqfast.ResidualVQ(3, 13, 6, backend="torch", **ORIGINAL)):
            calls.clear()
            with vq.accumulate():
                for _ in range(4):
                    vq(torch.randn(2, 6, 5))
            assert len(calls) == 1, type(vq).__name__
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_accumulation_window_reads_nothing_on_the_host(backend):
    from test_no_sync import HostReads
    vq = vqfast.VectorQuantizerEMA(13, 6, 0.25, kmeans_init=False, dead_code_threshold=1.0,
                                   backend=backend).to(DEVICE)
    frozen = vqfast.ResidualVQ(2, 13, 6, freeze_codebook=True, backend=backend, **ORIGINAL).to(DEVICE)
    rvq = vqfast.ResidualVQ(3, 13, 6, quantize_dropout=True, kmeans_init=False,
                            backend=backend).to(DEVICE)
    with HostReads() as recorder:
        for module in (vq, rvq):
            with module.accumulate():
                for _ in range(2):
                    z = torch.randn(2, 6, 5, device=DEVICE, requires_grad=True)
                    loss, q, _, _ = module(z)
                    (loss + q.square().mean()).backward()
        vq.encode(torch.randn(2, 6, 5, device=DEVICE))
        frozen(torch.randn(2, 6, 5, device=DEVICE))
        frozen.encode(torch.randn(2, 6, 5, device=DEVICE))
    assert recorder.found == [], recorder.found


# --- channel-last inputs ----------------------------------------------------------------

LAYOUTS = {
    "plain": lambda b, **kw: vqfast.VectorQuantizer(13, 6, 0.25, backend=b, **ORIGINAL, **kw),
    "ema+codebook_dim": lambda b, **kw: vqfast.VectorQuantizerEMA(
        13, 6, 0.25, codebook_dim=4, backend=b, **ORIGINAL, **kw),
    "ema+cosine+rotation": lambda b, **kw: vqfast.VectorQuantizerEMA(
        13, 6, 0.25, cosine=True, rotation_trick=True, backend=b, **ORIGINAL, **kw),
    "residual+groups": lambda b, **kw: vqfast.ResidualVQ(3, 13, 6, groups=2, backend=b,
                                                         **ORIGINAL, **kw),
    "fsq": lambda b, **kw: vqfast.FSQ([5, 4, 3], dim=6, backend=b, **kw),
    "lfq": lambda b, **kw: vqfast.LFQ(6, backend=b, **kw),
    "residual-fsq": lambda b, **kw: vqfast.ResidualFSQ([5, 4], 2, dim=6, groups=2, backend=b, **kw),
    "residual-lfq": lambda b, **kw: vqfast.ResidualLFQ(6, 2, codebook_dim=2, groups=2, backend=b,
                                                       **kw),
}
MASKABLE = ["plain", "ema+codebook_dim", "residual+groups"]


def _same_in_layout(first, last):
    """Channels-first outputs ``first`` equal channel-last ``last`` (channels moved last)."""
    for a, b in zip(first, last):
        if a.dim() >= 2 and a.shape != b.shape:
            a = a.movedim(1, -1)
        if a.dtype == torch.int64:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, masked", [(k, False) for k in LAYOUTS] + [(k, True) for k in MASKABLE])
def test_channel_last_equals_channels_first_read_in_place(kind, masked, backend):
    """[B, *spatial, D] in and out: outputs, codes, gradients and state equal the
    channels-first module's (itself tested against the oracle), three training steps; the
    inputs are read in place."""
    torch.manual_seed(0)
    first = LAYOUTS[kind](backend).to(DEVICE)
    last = LAYOUTS[kind](backend, channel_last=True).to(DEVICE)
    last.load_state_dict(first.state_dict())
    for _ in range(3):
        x = torch.randn(2, 6, 5, 3, device=DEVICE)
        xl = x.movedim(1, -1).contiguous()
        assert last._vectors_of("inputs", xl, 6).data_ptr() == xl.data_ptr()  # no copy
        x.requires_grad_()
        xl.requires_grad_()
        options = {}
        if masked:
            mask = torch.rand(2, 5, 3, device=DEVICE) > 0.3
            options = dict(mask=mask)
        out_first, out_last = first(x, **options), last(xl, **options)
        _same_in_layout(out_first, out_last)
        quantized = 0 if kind.endswith("fsq") else 1
        weight = torch.randn_like(x)  # the same weights in each layout
        for out, w in ((out_first, weight), (out_last, weight.movedim(1, -1))):
            loss = 0 if kind.endswith("fsq") else out[0]
            (loss + (out[quantized] * w).sum()).backward()
        torch.testing.assert_close(x.grad.movedim(1, -1), xl.grad, **TOL[torch.float32])
    for key, value in tensor_state(first).items():
        torch.testing.assert_close(tensor_state(last)[key], value, **TOL[torch.float32])
    first.eval()
    last.eval()
    x = torch.randn(2, 6, 5, 3, device=DEVICE)
    xl = x.movedim(1, -1).contiguous()
    codes_first, codes_last = first.encode(x), last.encode(xl)
    _same_in_layout([codes_first], [codes_last])
    _same_in_layout([first.decode_indices(codes_first)], [last.decode_indices(codes_last)])
    if masked:
        mask = torch.rand(2, 5, 3, device=DEVICE) > 0.3
        _same_in_layout([first.encode(x, mask=mask)], [last.encode(xl, mask=mask)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_last_tokens_match_the_oracle(backend):
    """Transformer tokens [B, N, D] through VectorQuantizerEMA(channel_last=True) against
    the original algorithm's oracle fed [B, D, N]: outputs and EMA state, three steps."""
    from vqfast import reference
    ref = reference.VectorQuantizerEMA(13, 6, 0.25, 0.99, 1e-5).to(DEVICE)
    vq = vqfast.VectorQuantizerEMA(13, 6, 0.25, 0.99, 1e-5, backend=backend, channel_last=True,
                                   **ORIGINAL).to(DEVICE)
    vq.load_state_dict(ref.state_dict())
    for _ in range(3):
        tokens = torch.randn(3, 7, 6, device=DEVICE)
        loss_r, q_r, perplexity_r, _ = ref(tokens.transpose(1, 2))
        loss, q, perplexity, codes = vq(tokens)
        assert codes.shape == (3, 7)
        torch.testing.assert_close(q, q_r.transpose(1, 2), **TOL[torch.float32])
        torch.testing.assert_close(loss, loss_r, **TOL[torch.float32])
        torch.testing.assert_close(perplexity, perplexity_r, **TOL[torch.float32])
    torch.testing.assert_close(vq.codebook, ref._embedding.weight.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vq.ema_cluster_size, ref._ema_cluster_size, rtol=1e-5, atol=1e-5)


# --- loss breakdown ---------------------------------------------------------------------

BREAKDOWN = {
    "plain": lambda b: vqfast.VectorQuantizer(13, 6, 0.3, backend=b, **ORIGINAL),
    "plain+cosine+codebook_dim": lambda b: vqfast.VectorQuantizer(
        13, 6, 0.3, cosine=True, codebook_dim=4, backend=b, **ORIGINAL),
    "ema": lambda b: vqfast.VectorQuantizerEMA(13, 6, 0.3, backend=b, **ORIGINAL),
    "residual-learned": lambda b: vqfast.ResidualVQ(3, 13, 6, 0.3, ema=False, groups=2,
                                                    backend=b, **ORIGINAL),
    "residual-ema": lambda b: vqfast.ResidualVQ(2, 13, 6, 0.3, backend=b, **ORIGINAL),
    "lfq": lambda b: vqfast.LFQ(6, commitment_cost=0.3, backend=b),
    "fsq": lambda b: vqfast.FSQ([5, 4, 3], dim=6, backend=b),
    "residual-fsq": lambda b: vqfast.ResidualFSQ([5, 4, 3], 2, groups=2, backend=b),
    "residual-lfq": lambda b: vqfast.ResidualLFQ(6, 2, groups=3, commitment_cost=0.3, backend=b),
}


def _grads(term, tensors):
    grads = torch.autograd.grad(term, tensors, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", BREAKDOWN)
def test_loss_breakdown_sums_to_the_loss_and_splits_its_gradient(kind, backend):
    """The terms add up to the loss, value and gradient; the commitment term moves only the
    input, the codebook term only the codebook; against the oracle's terms for the plain
    quantizer."""
    torch.manual_seed(0)
    vq = BREAKDOWN[kind](backend).to(DEVICE)
    x = torch.randn(2, 6, 5, 3, device=DEVICE, requires_grad=True)
    out = vq(x, return_loss_breakdown=True)
    terms = out[-1]
    assert isinstance(terms, vqfast.LossBreakdown)
    if kind.endswith("fsq"):
        assert all(float(t) == 0 for t in terms) and len(out) == 3
        return
    loss = out[0]
    torch.testing.assert_close(sum(terms), loss.float(), rtol=1e-6, atol=1e-6)
    params = [x] + [p for p in vq.parameters() if p.requires_grad]
    total = _grads(loss, params)
    parts = [_grads(t, params) if t.requires_grad else [torch.zeros_like(p) for p in params]
             for t in terms]
    for i, g in enumerate(total):
        torch.testing.assert_close(sum(part[i] for part in parts), g, rtol=1e-5, atol=1e-6)
    codebook = [i for i, p in enumerate(params) if p is getattr(vq, "codebook", None)
                or p is getattr(vq, "codebooks", None)]
    commitment, codebook_term = parts[0], parts[1]
    for i in codebook:
        assert float(commitment[i].abs().max()) == 0  # the commitment term leaves the codebook
    assert float(codebook_term[0].abs().max()) == 0  # the codebook term leaves the input
    if kind.startswith("plain") or kind in ("residual-learned", "residual-ema"):
        ratio = terms.codebook / terms.commitment
        expected = 0.0 if kind.endswith("ema") else 1 / 0.3  # mse(q, sg x) = mse(sg q, x)
        torch.testing.assert_close(ratio, torch.tensor(expected, device=DEVICE), rtol=1e-4, atol=1e-6)
    if kind == "ema":
        assert float(terms.codebook) == 0
    if kind.endswith("lfq"):
        assert float(terms.entropy) != 0 and float(terms.diversity) != 0


def test_loss_breakdown_matches_the_oracle_terms():
    from vqfast import reference
    ref = reference.VectorQuantizer(13, 6, 0.3)
    with torch.no_grad():
        ref._embedding.weight.normal_()
    vq = vqfast.VectorQuantizer(13, 6, 0.3, backend="torch", **ORIGINAL)
    vq.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 5, 3)
    _, quantized, _, _, terms = vq(x, return_loss_breakdown=True)
    flat = x.movedim(1, -1).reshape(-1, 6)
    q = quantized.detach().movedim(1, -1).reshape(-1, 6)
    torch.testing.assert_close(terms.commitment, 0.3 * torch.nn.functional.mse_loss(flat, q))
    torch.testing.assert_close(terms.codebook, torch.nn.functional.mse_loss(q, flat))
