"""``kernels._launch.launch``: the fast path past triton's per-launch binder launches, for
every quantizer's training step, the specialisation triton itself would pick, with the
arguments triton would pass (checked with the launches stubbed at triton's cache-hit work,
in a subprocess: the interpreter must be off)."""

import textwrap

import pytest

from _util import run_uninterpreted

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    from benchmarks import host
    from vqfast.kernels import _launch

    _launch.CHECK_LAUNCH_KEYS = True  # every fast launch asks triton which kernel it runs
    key = _launch._arg_key
    if sys.argv[1] == "no alignment":  # keys that forget what triton specialises on
        _launch._arg_key = lambda args: key([a for a in args if not isinstance(a, torch.Tensor)])
    elif sys.argv[1] == "no integers":
        _launch._arg_key = lambda args: key([a for a in args if type(a) is not int])
    elif sys.argv[1] == "1 as divisible by 16":  # an int key where 1 and a multiple of 16 meet
        _launch._arg_key = lambda args: key([16 if type(a) is int and a == 1 else a for a in args])
    seen = {}  # (kernel, triton's key) -> the arguments of its first launch (triton's path)
    fast = []
    count = [0]

    def run(self, g0, g1, g2, stream, function, metadata, launch_metadata, enter, leave, *args):
        # the tensors' dtypes, the numbers' types, the constexprs' values
        summary = tuple(a.dtype if isinstance(a, torch.Tensor) else
                        type(a) if type(a) in (int, float) else a for a in args)
        first = seen.setdefault((self.name, self.key), summary)
        if len(seen) > count[0]:
            count[0] = len(seen)
        else:
            fast.append(self.name)
            assert summary == first, (self.name, summary, first)
        self.launches.launched(self.name, self.key, args)

    host._Compiled.run = run
    launches = host.StubbedLaunches()
    with launches.stubbed():
        for name, build, shape, kind in host._cases():
            if kind != "vqfast":
                continue
            torch.manual_seed(0)
            module = build("torch").train()
            for offset in (0, 1, 4):  # x aligned to 16 bytes, and not
                x = torch.randn(torch.Size(shape).numel() + offset)[offset:].view(shape)
                x.requires_grad_(True)
                host._step(module, x, [None, None])  # (k-means init on the torch path)
                host._set_backend(module, "triton")
                for _ in range(2):
                    host._step(module, x, [None, None])
                host._set_backend(module, "torch")
        # one kernel at sizes triton specialises apart: S = 1 (a constant), 16, 17; N = 1
        from vqfast import kernels
        book = torch.randn(13, 8)
        for shape in ((5, 8), (2, 8, 16), (1, 8, 1), (3, 8, 17), (2, 8, 16), (5, 8)):
            kernels.nearest_code(torch.randn(*shape), book)
    print(len(fast), len(set(fast)))
''')


def _run(mode):
    return run_uninterpreted(SCRIPT, mode)


@pytest.mark.slow
def test_fast_launches_pick_triton_s_specialisation_and_arguments():
    result = _run("real")
    assert result.returncode == 0, result.stderr[-3000:]
    launches, kernels = map(int, result.stdout.split()[-2:])
    assert launches > 100 and kernels >= 12  # most launches took the fast path


@pytest.mark.slow
@pytest.mark.parametrize("blind_to", ["no alignment", "no integers", "1 as divisible by 16"])
def test_a_fast_key_blind_to_a_specialisation_is_caught(blind_to):
    result = _run(blind_to)
    assert result.returncode != 0
    assert "picked another specialisation than triton's" in result.stderr
