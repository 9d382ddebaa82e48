"""Per-level perplexity of the residual quantizers' code counts, one launch (the notebook's
formula, ``exp(-sum p log(p + 1e-10))`` with ``p = counts / max(sum counts, 1)``; torch
path: ``vqfast._torch.residual_vq.level_perplexity``)."""

import torch
import triton
import triton.language as tl

from ._launch import check_same_device, launch, launcher

CONFIG = dict(BLOCK_K=1024, num_warps=4)


@triton.jit
def _level_perplexity_kernel(counts_ptr, out_ptr, K, BLOCK_K: tl.constexpr):
    level = tl.program_id(0)
    counts_ptr += level.to(tl.int64) * K
    lanes = tl.arange(0, BLOCK_K)
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        total += tl.load(counts_ptr + k0 + lanes, mask=k0 + lanes < K, other=0).to(tl.float32)
    total_count = tl.maximum(tl.sum(total, axis=0), 1.0)
    entropy = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        p = tl.load(counts_ptr + k0 + lanes, mask=k0 + lanes < K, other=0).to(tl.float32)
        p = p / total_count
        entropy += p * tl.log(p + 1e-10)
    tl.store(out_ptr + level, tl.exp(-tl.sum(entropy, axis=0)))


@launcher
def level_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``counts`` int32 ``[L, K]`` -> fp32 ``[L]`` perplexities (1 for a level that counted
    nothing)."""
    if counts.dim() != 2 or counts.dtype != torch.int32 or not counts.is_contiguous():
        raise ValueError(f"counts must be a contiguous int32 [L, K], got {counts.dtype} "
                         f"{tuple(counts.shape)}")
    check_same_device(counts=counts)
    out = torch.empty(counts.shape[0], dtype=torch.float32, device=counts.device)
    launch(_level_perplexity_kernel, (counts.shape[0],), counts, out, counts.shape[1], **CONFIG)
    return out


def aot_variants():
    yield ("level_perplexity", _level_perplexity_kernel, {"counts_ptr": "*i32", "out_ptr": "*fp32",
                                                          "K": "i32"},
           {"BLOCK_K": CONFIG["BLOCK_K"]}, {"num_warps": CONFIG["num_warps"]})
