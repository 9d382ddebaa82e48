"""The chaos mode (``tests/_chaos.py``) takes effect: a kernel that trusts program order
fails under it, the atomic ticket of ``gather_loss`` does not, and new empty tensors are
poisoned. Run the kernel tests under it with ``pytest --chaos=random``."""

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from vqfast import kernels, reference  # noqa: E402
from _chaos import chaos  # noqa: E402
from _util import DEVICE, INTERPRETED, INTERPRETER_BROKEN  # noqa: E402

pytestmark = [pytest.mark.chaos, pytest.mark.skipif(not INTERPRETED or INTERPRETER_BROKEN is not None,
                                 reason="chaos mode patches the Triton interpreter"),
              pytest.mark.own_chaos]


@triton.jit
def _last_program_sums(values_ptr, partial_ptr, ticket_ptr, out_ptr, USE_TICKET: tl.constexpr):
    """Each program stores one partial; "the last program" adds them all up. Planted bug
    when not ``USE_TICKET``: ``pid == num_programs - 1`` is the last in grid order only."""
    pid = tl.program_id(0)
    tl.store(partial_ptr + pid, tl.load(values_ptr + pid))
    if USE_TICKET:
        tl.debug_barrier()
        last = tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == tl.num_programs(0) - 1
    else:
        last = pid == tl.num_programs(0) - 1
    if last:
        lanes = tl.arange(0, 16)
        tl.store(out_ptr, tl.sum(tl.load(partial_ptr + lanes, mask=lanes < tl.num_programs(0),
                                         other=0.0, cache_modifier=".cg"), axis=0))


def _run(use_ticket):
    values = torch.arange(1.0, 12.0)
    partial = torch.empty(11)
    out, ticket = torch.zeros(()), torch.zeros(1, dtype=torch.int32)
    _last_program_sums[(11,)](values, partial, ticket, out, USE_TICKET=use_ticket)
    return float(out)


@pytest.mark.parametrize("order", ["reversed", "random"])
def test_chaos_catches_a_kernel_that_trusts_program_order(order):
    assert _run(use_ticket=False) == 66.0  # in grid order the planted bug passes
    with chaos(order):
        planted = _run(use_ticket=False)
        ticket = _run(use_ticket=True)
    assert planted != 66.0  # it summed unwritten (poisoned) partials: NaN, or a partial sum
    assert ticket == 66.0


def test_chaos_poisons_new_tensors_and_restores():
    with chaos("reversed"):
        assert torch.empty(3).isnan().all() and torch.empty_like(torch.zeros(2)).isnan().all()
        assert (torch.empty(2, dtype=torch.int32) != 0).all()
        assert torch.zeros(2).new_empty(4).isnan().all()
        assert torch.empty(2, dtype=torch.bool).all()
    assert not getattr(torch.empty, "__wrapped__", None)


def test_chaos_rejects_unknown_order():
    with pytest.raises(ValueError, match="order"):
        with chaos("sideways"):
            pass


@pytest.mark.parametrize("order", ["reversed", "random"])
def test_gather_loss_ticket_holds_under_chaos(order):
    """The real hand-off: loss and perplexity reduced by the last program to take a ticket."""
    x = torch.randn(70, 9, device=DEVICE)
    codebook = torch.randn(13, 9, device=DEVICE)
    idx = reference.nearest_code(x, codebook)
    with chaos(order):
        q, loss, perplexity, counts, code_sums = kernels.gather_loss(x, codebook, idx, True)
    assert torch.equal(q, codebook[idx])
    torch.testing.assert_close(loss, (q - x).pow(2).sum(), rtol=1e-5, atol=1e-5)
    assert torch.equal(counts.long(), torch.bincount(idx, minlength=13))
    p = counts.float() / 70
    torch.testing.assert_close(perplexity, torch.exp(-(p * torch.log(p + 1e-10)).sum()))
    torch.testing.assert_close(code_sums, torch.zeros(13, 9).index_add_(0, idx, x))
