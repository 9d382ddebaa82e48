"""The VQ-VAE: shapes, codes in and out, seed checkpoints, bad input."""

import pytest
import torch

import vqfast
from _util import DEVICE, tensor_state

SMALL = dict(num_hiddens=16, num_residual_layers=2, num_residual_hiddens=8, num_embeddings=24,
             embedding_dim=8, commitment_cost=0.25)

# The seed notebook's names for VQVAE's submodules and quantizer tensors.
SEED_NAMES = [("encoder.", "_encoder."), ("pre_vq_conv.", "_pre_vq_conv."), ("decoder.", "_decoder."),
              ("vq.codebook", "_vq_vae._embedding.weight"), ("vq.ema_weight", "_vq_vae._ema_w"),
              ("vq.ema_cluster_size", "_vq_vae._ema_cluster_size")]


def _seed_layout(state_dict, ema=True):
    """The notebook's checkpoint of the same model: its names, and only its tensors (its
    plain quantizer had the codebook alone)."""
    renamed = {}
    for key, value in state_dict.items():
        for ours, seed in SEED_NAMES:
            if key.startswith(ours):
                key = seed + key[len(ours):]
                break
        else:
            if key.startswith("vq."):
                continue
        if ema or "_ema_" not in key:
            renamed[key] = value
    return renamed


@pytest.mark.parametrize("decay", [0.0, 0.99])
def test_forward_shapes_and_quantizer_kind(decay):
    model = vqfast.VQVAE(**SMALL, decay=decay).to(DEVICE)
    assert isinstance(model.vq, vqfast.VectorQuantizerEMA if decay else vqfast.VectorQuantizer)
    x = torch.rand(3, 3, 16, 12, device=DEVICE) - 0.5
    loss, x_recon, perplexity = model(x)
    assert x_recon.shape == x.shape and loss.dim() == 0 and perplexity.dim() == 0
    (loss + x_recon.pow(2).mean()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_encode_decode_indices_round_trip():
    model = vqfast.VQVAE(**SMALL, decay=0.99).to(DEVICE).eval()
    x = torch.rand(2, 3, 32, 32, device=DEVICE) - 0.5
    indices = model.encode(x)
    assert indices.shape == (2, 8, 8) and indices.dtype == torch.int64
    with torch.no_grad():
        _, x_recon, _ = model(x)
    torch.testing.assert_close(model.decode_indices(indices), x_recon)
    with pytest.raises(ValueError, match="indices"):
        model.decode_indices(torch.full((1, 2, 2), 24, device=DEVICE))


@pytest.mark.parametrize("decay", [0.0, 0.99])
def test_seed_model_state_dict_loads(decay):
    source = vqfast.VQVAE(**SMALL, decay=decay)
    seed_state = _seed_layout(source.state_dict(), ema=decay > 0)
    assert any(k.startswith("_vq_vae._embedding") for k in seed_state)
    assert "_encoder._residual_stack._layers.0._block.1.weight" in seed_state
    target = vqfast.VQVAE(**SMALL, decay=decay)
    target.load_state_dict(seed_state)
    loaded = {key for key in tensor_state(source) if _seed_layout({key: 0}, decay > 0)}
    assert len(loaded) == len(seed_state)
    for key in loaded:
        assert torch.equal(target.state_dict()[key], source.state_dict()[key]), key
    assert target.vq._kmeans_done  # a loaded, trained codebook is not re-initialised


def test_bad_images_raise():
    model = vqfast.VQVAE(**SMALL)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.rand(2, 3, 15, 16))


class _NotebookResidual(torch.nn.Module):
    """The original notebook's residual block, as written there (in-place ReLUs)."""

    def __init__(self, in_channels, num_hiddens, num_residual_hiddens):
        super().__init__()
        self._block = torch.nn.Sequential(
            torch.nn.ReLU(True),
            torch.nn.Conv2d(in_channels, num_residual_hiddens, 3, 1, 1, bias=False),
            torch.nn.ReLU(True),
            torch.nn.Conv2d(num_residual_hiddens, num_hiddens, 1, 1, bias=False))

    def forward(self, x):
        return x + self._block(x)


def test_original_residual_computes_the_notebooks_block():
    """``original_residual=True`` reproduces the notebook's in-place-ReLU skip (outputs and
    gradients), the default skips x itself; the state_dict keys agree either way."""
    torch.manual_seed(0)
    notebook = _NotebookResidual(8, 8, 4)
    ours, default = vqfast.Residual(8, 8, 4, original=True), vqfast.Residual(8, 8, 4)
    ours.load_state_dict(notebook.state_dict())
    default.load_state_dict(notebook.state_dict())
    x = torch.randn(2, 8, 5, 5)
    x_n, x_o = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_n = notebook(x_n * 1.0)  # (a non-leaf: the in-place ReLU may rewrite it)
    out_o = ours(x_o)
    torch.testing.assert_close(out_o, out_n)
    out_n.square().sum().backward()
    out_o.square().sum().backward()
    torch.testing.assert_close(x_o.grad, x_n.grad)
    assert not torch.allclose(default(x), out_n)
    a = vqfast.VQVAE(16, 1, 8, 32, 8, decay=0.99, original_residual=True)
    b = vqfast.VQVAE(16, 1, 8, 32, 8, decay=0.99)
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
