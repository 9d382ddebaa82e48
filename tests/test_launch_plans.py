"""Launch plans (``vqfast.kernels._plan``): an op's recorded launches replayed must be the
launches its own path makes, for every quantizer's training step. Checked with the launches
stubbed at triton's cache-hit work (in a subprocess: the interpreter must be off): each
step's launches (kernel, triton's specialisation, grid, every argument: a number's value, a
tensor's dtype, shape, strides, offset, which module state or input it is, which other
argument of the launch it shares memory with) and its other aten compute ops, with plans
and without, side by side; and plans that forget what a launch depends on are caught."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import collections
    import sys
    import torch
    from benchmarks import host
    from vqfast.kernels import _plan

    mode = sys.argv[1]
    if mode == "no alignment":  # a key that forgets the inputs' 16-byte alignment
        key_of = _plan.key_of
        _plan.key_of = lambda args: key_of([
            torch.empty_strided(a.shape, a.stride(), dtype=a.dtype)
            if isinstance(a, torch.Tensor) else a for a in args])
    elif mode == "zeros as empty":  # zeroed buffers replayed without their zeros
        _plan._ALLOCATIONS = _plan._ALLOCATIONS | _plan._ZEROS

    log = []
    roles = {}

    def describe(args):
        ptrs = []
        out = []
        for a in args:
            if isinstance(a, torch.Tensor):
                ptr = a.untyped_storage().data_ptr() if a.untyped_storage().nbytes() else None
                shared = ptrs.index(ptr) if ptr is not None and ptr in ptrs else None
                ptrs.append(ptr)
                out.append((str(a.dtype), tuple(a.shape), a.stride(), a.storage_offset(),
                            roles.get(ptr, "new"), shared))
            else:
                ptrs.append(None)
                out.append(a)
        return tuple(out)

    def run(self, g0, g1, g2, stream, function, metadata, launch_metadata, enter, leave, *args):
        log.append((self.name, self.key, (g0, g1, g2), describe(args)))
        self.launches.launched(self.name, self.key, args)

    host._Compiled.run = run

    def steps(plans):
        """Per case and step: (launches, other compute ops)."""
        _plan.PLANS = plans
        result = {}
        launches = host.StubbedLaunches()
        with launches.stubbed():
            for name, build, shape, kind in host._cases():
                if kind != "vqfast":
                    continue
                torch.manual_seed(0)
                module = build("torch").train()
                for turn, offset in enumerate((0, 1, 0)):  # x aligned to 16 bytes, and not
                    x = torch.randn(torch.Size(shape).numel() + offset)[offset:].view(shape)
                    x.requires_grad_(True)
                    host._step(module, x, [None, None])  # (k-means init on the torch path)
                    host._set_backend(module, "triton")
                    roles.clear()
                    for label, t in [*module.state_dict(keep_vars=True).items(), ("x", x)]:
                        if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                            roles[t.untyped_storage().data_ptr()] = label
                    for step in range(3):
                        del log[:]
                        counting = host._CountOps()
                        with counting:
                            host._step(module, x, [None, None])
                        x.grad = None
                        result[name, turn, step] = (list(log), dict(counting.ops))
                    host._set_backend(module, "torch")
        return result

    own, planned = steps(False), steps(True)
    bad = [key for key in own if own[key] != planned[key]]
    for key in bad[:3]:
        for a, b in zip(own[key][0], planned[key][0]):
            if a != b:
                print("launch differs:", key, a, b, sep="\\n  ", file=sys.stderr)
                break
        else:
            print("ops differ:", key, own[key][1], planned[key][1], sep="\\n  ",
                  file=sys.stderr)
    assert not bad, f"{len(bad)} of {len(own)} steps differ"
    replayed = sum(len(v[0]) for v in planned.values())
    print(len(own), replayed)
''')


def _run(mode):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_replayed_plans_launch_what_the_ops_launch():
    result = _run("real")
    assert result.returncode == 0, result.stderr[-3000:]
    steps, launches = map(int, result.stdout.split()[-2:])
    assert steps >= 90 and launches > 300


@pytest.mark.slow
@pytest.mark.parametrize("blind_to", ["no alignment", "zeros as empty"])
def test_a_plan_blind_to_what_a_call_depends_on_is_caught(blind_to):
    result = _run(blind_to)
    assert result.returncode != 0
    assert "steps differ" in result.stderr, result.stderr[-3000:]
