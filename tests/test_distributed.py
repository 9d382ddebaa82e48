"""FSDP2 (``fully_shard``) and DDP + ``torch.compile`` on 2 gloo ranks: the EMA state after
training steps equals one process fed the whole batch, for VectorQuantizerEMA and
ResidualVQ, also when one rank's batch is padding only (nothing hangs)."""

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import vqfast
from _util import ORIGINAL
from test_production import spawn_two_ranks

KINDS = {
    "ema": lambda: vqfast.VectorQuantizerEMA(11, 6, 0.25, backend="torch", **ORIGINAL),
    "residual": lambda: vqfast.ResidualVQ(2, 11, 6, groups=2, backend="torch", **ORIGINAL),
}
STEPS = 2


class Model(nn.Module):
    """A learned 1x1 conv (a parameter for FSDP to shard, DDP to sync) before a quantizer."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(6, 6, 1)
        self.vq = KINDS[kind]()

    def forward(self, x, mask):
        loss, quantized, _, _ = self.vq(self.conv(x), mask=mask)
        return loss + quantized.square().mean()


def _data(world):
    """Per step: each rank's batch and mask; rank 1's mask is all padding on step 0."""
    g = torch.Generator().manual_seed(1)
    steps = []
    for step in range(STEPS):
        batch = torch.randn(2 * world, 6, 9, generator=g)
        mask = torch.rand(2 * world, 9, generator=g) > 0.3
        if step == 0:
            mask[2:] = False  # rank 1: padding only
        steps.append((batch, mask))
    return steps


def _state(model):
    return {k: v.detach().clone() for k, v in model.vq.state_dict().items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _worker(rank, world, port, mode, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for kind in KINDS:
            model = Model(kind)
            if mode == "fsdp2":
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard
                fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
                step_fn = model
            else:
                from torch.nn.parallel import DistributedDataParallel
                step_fn = torch.compile(DistributedDataParallel(model), backend="aot_eager")
            opt = torch.optim.SGD(model.parameters(), lr=0.0)  # see below
            for batch, mask in _data(world):
                step_fn(batch.chunk(world)[rank], mask.chunk(world)[rank]).backward()
                opt.step()
                opt.zero_grad()
            results[kind] = {k: v.numpy().copy() for k, v in _state(model).items()}
        queue.put((rank, results))
        dist.barrier()  # both ranks done before either tears gloo down
    finally:
        dist.destroy_process_group()
    # Done and torn down: leave without the interpreter's teardown, where a gloo or FSDP
    # thread still alive can abort the process ("terminate called without an active
    # exception", seen once in CI with fsdp2) after its result was sent
    queue.close()
    queue.join_thread()
    os._exit(0)


@pytest.mark.parametrize("mode", ["fsdp2", "ddp+compile"])
def test_two_ranks_equal_one_process_on_the_whole_batch(mode):
    results = spawn_two_ranks(_worker, mode)
    for kind in KINDS:
        single = Model(kind)
        # lr 0: the conv stays put (a rank's mean loss over its real rows is not the global
        # mean, so DDP's averaged gradients differ from one process's): both runs feed the
        # quantizer the same vectors, and its EMA state must agree
        opt = torch.optim.SGD(single.parameters(), lr=0.0)
        for batch, mask in _data(2):
            single(batch, mask).backward()
            opt.step()
            opt.zero_grad()
        for key, value in _state(single).items():
            for rank in (0, 1):
                torch.testing.assert_close(torch.from_numpy(results[rank][kind][key]), value,
                                           rtol=1e-5, atol=1e-5, msg=f"{mode} {kind} {key} rank {rank}")
