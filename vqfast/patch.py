"""``vqfast.patch(model)``: vqfast's nearest-code search and fused statistics inside models
other libraries wrote, in place.

Each known quantizer class keeps its own module, parameters, buffers and state-dict keys;
only the method that builds the ``[N, K]`` distance matrix (and, in training, the
``[N, K]`` one-hot of the EMA statistics) is replaced, on that instance, by one that calls
vqfast's ops. So a patched model loads and saves the checkpoints of the unpatched one, its
update rules (EMA decay, epsilon, dead-code expiry, k-means init) are its own code, and its
return values are unchanged. Codes agree with the original's except where two codes are at
the same distance within fp32 rounding (the two compute the distance in a different
order); ``vqfast.unpatch(model)`` restores the original methods.

    report = vqfast.patch(model)      # what was replaced, and what was left and why
    print(report)

Known quantizers (the library, then the class):

- Hugging Face transformers: ``EncodecEuclideanCodebook``, ``MimiEuclideanCodebook``,
  ``XcodecEuclideanCodebook``, ``WavTokenizerEuclideanCodebook`` (``quantize``: the search);
  ``DacVectorQuantize`` (``decode_latents``: the cosine search);
  ``ChameleonVQVAEVectorQuantizer``, ``JanusVQVAEVectorQuantizer`` (``forward``: search,
  losses and straight-through output, fused).
- diffusers: ``VectorQuantizer`` of ``VQModel`` (``forward``; not with ``remap``).
- facebook ``encodec`` (``encodec.quantization.core_vq.EuclideanCodebook``): ``quantize``
  and, in training, ``forward`` (counts and per-code sums without the one-hot).
- descript-audio-codec (``dac.nn.quantize.VectorQuantize``): ``decode_latents``, as
  transformers' DAC.
- kyutai ``moshi`` (``moshi.quantization.core_vq.EuclideanCodebook``, Mimi's training
  codebook): ``_quantize``, the search of encode and of training.
- vector-quantize-pytorch: ``VectorQuantize`` (and so each level of its ``ResidualVQ``)
  with one Euclidean codebook: its ``Codebook``'s ``forward`` (search and EMA statistics
  fused; masks, codebook transforms and top-k calls run the original).
- The original VQ-VAE notebook's ``VectorQuantizer`` and ``VectorQuantizerEMA``
  (``forward``; ``vqfast.reference`` holds them as written).
"""

import copy
import dataclasses
import sys
import warnings

import torch
import torch.nn.functional as F

from .ops.dispatch import PRECISIONS, check_backend, resolve_backend
from .ops.vq import _nearest_code_op, _quantize_op, quantize

__all__ = ["patch", "unpatch", "PatchReport", "LIBRARIES"]


# --- the shared pieces: search, statistics, learned-codebook forward ----------------------

def _settings(module, device: torch.device):
    """The patched module's ``(backend, precision)``, the backend resolved for ``device``.
    (Empty inputs never get here: ``_Patched`` runs the original method for them.)"""
    backend, precision = module._vqfast_patch
    return resolve_backend(backend, device), precision


def _codes(module, x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest code of every row of ``x [N, D]`` (int64 ``[N]``), no ``[N, K]`` tensor."""
    backend, precision = _settings(module, x.device)
    x, codebook = _promoted(x.detach(), codebook.detach())
    return _nearest_code_op(x.contiguous(), codebook.contiguous(), backend, precision)[0]


def _promoted(x: torch.Tensor, codebook: torch.Tensor):
    """Both in the wider of their dtypes: a patched search is never less precise than its
    operands (fp32 codebooks stay fp32 for half-precision inputs)."""
    dtype = torch.promote_types(x.dtype, codebook.dtype)
    return x.to(dtype), codebook.to(dtype)


def _codes_and_statistics(module, x: torch.Tensor, codebook: torch.Tensor):
    """``(idx [N], counts [K], code_sums [K, D])`` of ``x [N, D]`` in one search and one
    gather pass (the kernels' fused statistics on CUDA), no one-hot."""
    backend, precision = _settings(module, x.device)
    k = codebook.shape[0]
    x, codebook = _promoted(x.detach(), codebook.detach())
    with torch.no_grad():
        _, idx, _, _, counts, code_sums, _ = _quantize_op(
            x.contiguous(), codebook.contiguous(), True, 0.0, backend, precision)
    return idx, counts[:k], code_sums


def _learned_forward(module, z: torch.Tensor, codebook: torch.Tensor, commitment: float,
                     codebook_weight: float, with_code_sums: bool = False):
    """A codebook's step on channels-first ``z [B, D, *spatial]``: ``(q, loss, idx,
    perplexity, counts, code_sums)`` with ``q`` channels-first (value: the codes;
    gradient: straight through to ``z``), ``loss = commitment * mse(z, sg(q)) +
    codebook_weight * mse(sg(z), q)`` and, ``with_code_sums``, this batch's per-code
    counts and sums for an EMA update."""
    backend, precision = _settings(module, z.device)
    b, d = z.shape[:2]
    x = z.reshape(b, d, -1)
    if not x.is_contiguous():
        x = x.contiguous()
    q, loss, idx, perplexity, counts, code_sums = quantize(
        x, codebook, commitment, codebook_weight, with_code_sums=with_code_sums,
        backend=backend, precision=precision)
    return q.view(z.shape), loss, idx, perplexity, counts, code_sums


# --- the rules: one per known class --------------------------------------------------------

def _hf_euclidean_quantize(self, hidden_states):
    return _codes(self, hidden_states, self.embed)


def _hf_mimi_quantize(self, hidden_states):
    # Mimi compares in fp32 (torch.cdist on .float()).
    return _codes(self, hidden_states.float(), self.embed.float())


def _dac_codes(module, latents):
    """DAC's search of ``latents [B, D, T]``: the l2-normalised rows against the
    l2-normalised codebook (ViT-VQGAN) -> codes ``[B, T]``. (transformers' port adds
    ``|c|^2`` where it means to subtract it: the same ranking for unit rows, which
    F.normalize makes every nonzero row.)"""
    encodings = latents.permute(0, 2, 1).reshape(-1, latents.shape[1])
    codes = _codes(module, F.normalize(encodings), F.normalize(module.codebook.weight))
    return codes.reshape(latents.shape[0], -1)


def _hf_dac_decode_latents(self, hidden_states):  # transformers' DAC: raw codebook rows out
    indices = _dac_codes(self, hidden_states)
    return self.codebook(indices).transpose(1, 2), indices


def _dac_decode_latents(self, latents):  # descript-audio-codec's own
    indices = _dac_codes(self, latents)
    return self.decode_code(indices), indices


def _hf_vqvae_forward(self, hidden_state):
    # Chameleon / Janus: codebook term weighted by beta, commitment by 1 (as written there)
    q, loss, idx = _learned_forward(self, hidden_state, self.embedding.weight, 1.0, self.beta)[:3]
    return q, loss, idx


def _diffusers_forward(self, z):
    if self.legacy:  # diffusers' legacy weighting: commitment 1, codebook beta
        commitment, codebook_weight = 1.0, self.beta
    else:
        commitment, codebook_weight = self.beta, 1.0
    q, loss, idx = _learned_forward(self, z, self.embedding.weight, commitment,
                                    codebook_weight)[:3]
    if self.sane_index_shape:
        idx = idx.reshape(q.shape[0], q.shape[2], q.shape[3])
    return q, loss, (None, None, idx)


def _diffusers_check(module):
    if getattr(module, "remap", None) is not None:
        return "remap= (index remapping to a used subset) is not supported"
    return None


def _encodec_quantize(self, x):
    return _codes(self, x, self.embed)


def _encodec_forward(self, x):
    """facebook encodec's ``EuclideanCodebook.forward`` with the one-hot and its matmuls
    replaced by the fused counts and per-code sums; the rest is the module's own code."""
    own = sys.modules[type(self).__module__]
    shape, dtype = x.shape, x.dtype
    x = self.preprocess(x)
    self.init_embed_(x)
    if not self.training:
        embed_ind = self.postprocess_emb(self.quantize(x), shape)
        return self.dequantize(embed_ind), embed_ind
    idx, counts, code_sums = _codes_and_statistics(self, x, self.embed)
    embed_ind = self.postprocess_emb(idx, shape)
    quantize_ = self.dequantize(embed_ind)
    self.expire_codes_(x)
    own.ema_inplace(self.cluster_size, counts.to(dtype), self.decay)
    own.ema_inplace(self.embed_avg, code_sums.to(dtype), self.decay)
    cluster_size = (own.laplace_smoothing(self.cluster_size, self.codebook_size, self.epsilon)
                    * self.cluster_size.sum())
    self.embed.data.copy_(self.embed_avg / cluster_size.unsqueeze(1))
    return quantize_, embed_ind


def _moshi_quantize(self, x):
    # moshi's EMA statistics already avoid the one-hot (scatter_add); its search is cdist
    return _codes(self, x, self.embedding)


def _notebook_outputs(self, inputs, q, loss, idx, perplexity):
    # the notebook also returns the [N, K] one-hot encodings (its callers may read them)
    encodings = F.one_hot(idx, self._num_embeddings).to(torch.float32)
    return loss, q.view(inputs.shape), perplexity, encodings


def _notebook_forward(self, inputs):
    q, loss, idx, perplexity, _, _ = _learned_forward(self, inputs, self._embedding.weight,
                                                      self._commitment_cost, 1.0)
    return _notebook_outputs(self, inputs, q, loss, idx, perplexity)


def _notebook_ema_forward(self, inputs):
    codebook = self._embedding.weight  # (the notebook computes in fp32)
    q, loss, idx, perplexity, counts, code_sums = _learned_forward(
        self, inputs.float(), codebook, self._commitment_cost, False,
        with_code_sums=self.training)
    if self.training:
        with torch.no_grad():
            size, weight, decay, eps = self._ema_cluster_size, self._ema_w, self._decay, self._epsilon
            size.copy_(size * decay + (1 - decay) * counts[:codebook.shape[0]].float())
            n = torch.sum(size)
            size.copy_((size + eps) / (n + self._num_embeddings * eps) * n)
            weight.data.copy_(weight * decay + (1 - decay) * code_sums)
            codebook.copy_(weight / size.unsqueeze(1))
    return _notebook_outputs(self, inputs, q.to(inputs.dtype), loss, idx, perplexity)


class _Statistics:
    """What the patched vector-quantize-pytorch codebook hands its own ``update_codebook``
    in place of the ``[N, K]`` one-hot: this batch's counts and per-code sums."""

    def __init__(self, counts, code_sums):
        self.counts, self.code_sums = counts, code_sums


def _vqp_codebook_forward(self, x, sample_codebook_temp=None, mask=None, freeze_codebook=False,
                          codebook_transform_fn=None, ema_update_weight=None,
                          accum_ema_update=False, ema_update=None, topk=None, update_usage=True):
    """vector-quantize-pytorch's ``Codebook.forward`` for a single Euclidean codebook:
    the search and the EMA statistics fused, the module's own update, expiry and k-means.
    Calls with a mask, a codebook transform or top-k run the original method. The
    distances it returns are ``None`` (only the cross-entropy losses read them: a
    ``VectorQuantize`` asked for one runs the original codebook, see ``_vqp_forward``)."""
    if mask is not None or codebook_transform_fn is not None or topk is not None:
        return type(self).forward(self, x, sample_codebook_temp, mask, freeze_codebook,
                                  codebook_transform_fn, ema_update_weight, accum_ema_update,
                                  ema_update, topk, update_usage)
    ema_update = self.ema_update if ema_update is None else ema_update
    needs_codebook_dim = x.ndim < 4
    x = x.float()
    if needs_codebook_dim:
        x = x[None]
    flatten = x.reshape(x.shape[0], -1, x.shape[-1])  # [1, N, D]
    self.init_embed_(flatten, mask=None)
    embed = self.embed if self.learnable_codebook else self.embed.detach()
    embed = embed.to(x.dtype)[0]
    update = self.training and update_usage and not freeze_codebook
    if update:
        idx, counts, code_sums = _codes_and_statistics(self, flatten[0], embed)
    else:
        idx = _codes(self, flatten[0], embed)
    quantize = F.embedding(idx, embed).view(x.shape)
    embed_ind = idx.view(x.shape[:-1])
    if update:
        self.update_codebook(flatten, _Statistics(counts.float(), code_sums), mask=None,
                             ema_update_weight=ema_update_weight,
                             accum_ema_update=accum_ema_update, ema_update=ema_update)
    if needs_codebook_dim:
        quantize, embed_ind = quantize[0], embed_ind[0]
    return quantize, embed_ind, None


def _vqp_track(self, flatten, embed_onehot, mask=None, ema_update_weight=None,
               accum_ema_update=False):
    """``track_cluster_size_and_embed_avg`` from the fused statistics (the original's, when
    handed a real one-hot by its other callers, e.g. ``update_indices``)."""
    if not isinstance(embed_onehot, _Statistics):
        return type(self).track_cluster_size_and_embed_avg(
            self, flatten, embed_onehot, mask, ema_update_weight, accum_ema_update)
    own = sys.modules[type(self).__module__]
    cluster_size = embed_onehot.counts[None]
    self.all_reduce_fn(cluster_size)
    embed_sum = embed_onehot.code_sums[None].contiguous()
    self.all_reduce_fn(embed_sum)
    if callable(ema_update_weight):
        ema_update_weight = ema_update_weight(embed_sum, cluster_size)
    if accum_ema_update:
        own.accum_grad_(self.cluster_size, cluster_size)
        own.accum_grad_(self.embed_avg, embed_sum)
    else:
        own.ema_inplace(self.cluster_size, cluster_size, self.decay, ema_update_weight)
        own.ema_inplace(self.embed_avg, embed_sum, self.decay, ema_update_weight)


def _vqp_codebook_check(module):
    own = sys.modules[type(module).__module__]
    sampler = getattr(module.gumbel_sample, "keywords", {})
    reasons = [why for why, bad in [
        ("a gumbel_sample of its own",
         getattr(module.gumbel_sample, "func", module.gumbel_sample) is not own.gumbel_sample),
        ("several codebooks (separate_codebook_per_head)", module.num_codebooks != 1),
        ("use_cosine_sim=True", module.use_cosine_sim),
        ("affine_param=True", module.affine_param),
        ("a vq_bridge", module.vq_bridge is not None),
        ("stochastic_sample_codes=True", sampler.get("stochastic", False)),
        ("straight_through=True", sampler.get("straight_through", False)),
    ] if bad]
    return ", ".join(reasons) + " not supported" if reasons else None


def _vqp_forward(self, x, indices=None, *args, **kwargs):
    """``VectorQuantize.forward``; with ``indices`` (the cross-entropy loss against given
    codes, which reads the distance matrix) the original codebook runs."""
    if indices is None:
        return type(self).forward(self, x, None, *args, **kwargs)
    codebook = self._codebook
    patched = codebook.__dict__.pop("forward", None)
    try:
        return type(self).forward(self, x, indices, *args, **kwargs)
    finally:
        if patched is not None:
            codebook.__dict__["forward"] = patched


def _vqp_check(module):
    if module.commitment_use_cross_entropy_loss:
        return "commitment_use_cross_entropy_loss=True (reads the distance matrix) not supported"
    if getattr(module, "has_codebook_diversity_loss", False):
        return "codebook_diversity_loss_weight > 0 (reads the distance matrix) not supported"
    return _vqp_codebook_check(module._codebook) if hasattr(module, "_codebook") else None


def _is_notebook(module, ema: bool) -> bool:
    names = ("_embedding", "_embedding_dim", "_num_embeddings", "_commitment_cost")
    names += ("_ema_cluster_size", "_ema_w", "_decay", "_epsilon") if ema else ()
    return all(hasattr(module, n) for n in names)


@dataclasses.dataclass(frozen=True)
class _Rule:
    library: str
    methods: dict
    check: object = None  # module -> reason it cannot be patched, or None


# transformers' quantizers: (transformers.models.<path>, the model, the method patched, vqfast's)
_HF_RULES = (
    ("encodec.modeling_encodec.EncodecEuclideanCodebook", "EnCodec", "quantize",
     _hf_euclidean_quantize),
    ("xcodec.modeling_xcodec.XcodecEuclideanCodebook", "X-Codec", "quantize",
     _hf_euclidean_quantize),
    ("wavtokenizer.modeling_wavtokenizer.WavTokenizerEuclideanCodebook", "WavTokenizer",
     "quantize", _hf_euclidean_quantize),
    ("mimi.modeling_mimi.MimiEuclideanCodebook", "Mimi", "quantize", _hf_mimi_quantize),
    ("dac.modeling_dac.DacVectorQuantize", "DAC", "decode_latents", _hf_dac_decode_latents),
    ("chameleon.modeling_chameleon.ChameleonVQVAEVectorQuantizer", "Chameleon", "forward",
     _hf_vqvae_forward),
    ("janus.modeling_janus.JanusVQVAEVectorQuantizer", "Janus", "forward", _hf_vqvae_forward),
)
_RULES = {
    **{f"transformers.models.{path}": _Rule(f"transformers {model}", {method: fn})
       for path, model, method, fn in _HF_RULES},
    "diffusers.models.autoencoders.vae.VectorQuantizer":
        _Rule("diffusers VQModel", {"forward": _diffusers_forward}, _diffusers_check),
    "vector_quantize_pytorch.vector_quantize_pytorch.VectorQuantize":
        _Rule("vector-quantize-pytorch", {"forward": _vqp_forward}, _vqp_check),
    "vector_quantize_pytorch.vector_quantize_pytorch.Codebook":
        _Rule("vector-quantize-pytorch", {"forward": _vqp_codebook_forward,
                                          "track_cluster_size_and_embed_avg": _vqp_track},
              _vqp_codebook_check),
    "dac.nn.quantize.VectorQuantize":
        _Rule("descript-audio-codec", {"decode_latents": _dac_decode_latents}),
    "moshi.quantization.core_vq.EuclideanCodebook":
        _Rule("moshi", {"_quantize": _moshi_quantize}),
    "encodec.quantization.core_vq.EuclideanCodebook":
        _Rule("encodec", {"quantize": _encodec_quantize, "forward": _encodec_forward}),
}
_NOTEBOOK = {
    "VectorQuantizer": _Rule("the VQ-VAE notebook", {"forward": _notebook_forward}),
    "VectorQuantizerEMA": _Rule("the VQ-VAE notebook", {"forward": _notebook_ema_forward}),
}


def _rule_for(module):
    cls = type(module)
    rule = _RULES.get(f"{cls.__module__}.{cls.__qualname__}")
    # the notebook's classes, as vqfast.reference holds them or pasted into a user's code
    # (vqfast's own quantizers share their names)
    notebook = (cls.__module__.startswith("vqfast.reference.")
                or not cls.__module__.startswith("vqfast."))
    if (rule is None and notebook and cls.__qualname__ in _NOTEBOOK
            and _is_notebook(module, ema=cls.__qualname__.endswith("EMA"))):
        rule = _NOTEBOOK[cls.__qualname__]
    return rule


class _Patched:
    """A patched method bound to its module: run with autocast off (as the originals'
    ``cdist`` in fp32; vqfast accumulates in fp32 anyway), the original method for an
    empty first input (whatever the original does with it), and picklable (a patched
    model saved whole with ``torch.save`` loads patched)."""

    def __init__(self, fn, module, name):
        self.fn, self.module, self.name = fn, module, name

    def __call__(self, *args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(first, torch.Tensor) and first.numel() == 0:
            return getattr(type(self.module), self.name)(self.module, *args, **kwargs)
        device_type = first.device.type if isinstance(first, torch.Tensor) else "cpu"
        if not torch.is_autocast_enabled(device_type):  # (no autocast region in a trace)
            return self.fn(self.module, *args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return self.fn(self.module, *args, **kwargs)

    def __reduce__(self):
        return _Patched, (self.fn, self.module, self.name)

    def __deepcopy__(self, memo):
        return _Patched(self.fn, copy.deepcopy(self.module, memo), self.name)


# --- the public calls ------------------------------------------------------------------------

@dataclasses.dataclass
class PatchReport:
    """What ``vqfast.patch`` did: ``patched`` lists ``(module name, class, methods)`` of
    the quantizers it now runs through vqfast; ``left`` lists ``(module name, class, why)``
    of the quantizers it knows but left as they were."""

    patched: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.patched)

    def __str__(self) -> str:
        lines = [f"vqfast.patch: {len(self.patched)} quantizer(s) patched, "
                 f"{len(self.left)} left"]
        lines += [f"  patched {name or '<model>'} ({cls}): {', '.join(methods)}"
                  for name, cls, methods in self.patched]
        lines += [f"  left    {name or '<model>'} ({cls}): {why}" for name, cls, why in self.left]
        return "\n".join(lines)


LIBRARIES = ("transformers", "diffusers", "encodec", "moshi", "descript-audio-codec",
             "vector-quantize-pytorch", "notebook")


def _package(rule: _Rule) -> str:
    return "notebook" if rule.library.endswith("notebook") else rule.library.split()[0]


def patch(model: torch.nn.Module, *, backend: str = "auto", precision: str = "ieee",
          warn: bool = True, libraries=None) -> PatchReport:
    """Run the quantizers vqfast knows inside ``model`` (itself included) through vqfast's
    fused search, in place; returns a ``PatchReport``.

    Only the method that computes the ``[N, K]`` distances (and the ``[N, K]`` one-hot of
    EMA statistics) is replaced on each instance; parameters, buffers, state-dict keys,
    update rules and return values stay the model's own. ``backend`` (``"auto"``: Triton
    kernels on CUDA, the torch path elsewhere) and ``precision`` (``"ieee"``, ``"tf32x3"``,
    ``"tf32"``: the dot precision of fp32 searches on CUDA) apply to every patched module.
    A known quantizer with an option vqfast does not reproduce is left as it is, with a
    warning (``warn=False`` to silence it) and the reason in ``report.left``. Patching
    twice changes nothing; ``vqfast.unpatch(model)`` undoes it. ``libraries`` (names from
    ``vqfast.patch.LIBRARIES``, e.g. ``["encodec"]``): patch only their quantizers.

    Example::

        report = vqfast.patch(model)
        print(report)   # e.g. "patched quantizer.layers.0.codebook (EncodecEuclideanCodebook): quantize"
    """
    check_backend(backend)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(libraries, str):
        libraries = (libraries,)
    wanted = set(LIBRARIES if libraries is None else libraries)
    if not wanted <= set(LIBRARIES):
        raise ValueError(f"unknown libraries {sorted(wanted - set(LIBRARIES))}; "
                         f"known: {', '.join(LIBRARIES)}")
    report = PatchReport()
    inside_left = set()  # the submodules of a quantizer left as it is stay as they are
    for name, module in model.named_modules():
        rule = _rule_for(module)
        if rule is None or id(module) in inside_left or _package(rule) not in wanted:
            continue
        cls = type(module).__qualname__
        why = rule.check(module) if rule.check is not None else None
        if why is None and any(hasattr(m, "_hf_hook") for m in module.modules()):
            why = "accelerate hooks (offloaded or dispatched weights) not supported"
        if why is not None:
            inside_left.update(id(m) for m in module.modules())
            report.left.append((name, cls, why))
            if warn:
                warnings.warn(f"vqfast.patch left {name or 'the model'} ({cls}) as it is: {why}",
                              stacklevel=2)
            continue
        module._vqfast_patch = (backend, precision)
        for method, fn in rule.methods.items():
            module.__dict__[method] = _Patched(fn, module, method)
        report.patched.append((name, cls, tuple(rule.methods)))
    return report


patch.LIBRARIES = LIBRARIES  # (``vqfast.patch`` is this function: its names at hand)


def unpatch(model: torch.nn.Module) -> int:
    """Restore the original methods of every module ``vqfast.patch`` patched in ``model``;
    returns how many were restored."""
    restored = 0
    for module in model.modules():
        if "_vqfast_patch" not in module.__dict__:
            continue
        rule = _rule_for(module)
        for method in rule.methods:
            module.__dict__.pop(method, None)
        del module.__dict__["_vqfast_patch"]
        restored += 1
    return restored
