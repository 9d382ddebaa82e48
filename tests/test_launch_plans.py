"""Launch plans (``vqfast.kernels._plan``): an op's recorded launches replayed must be the
launches its own path makes, for every quantizer's training step. Checked with the launches
stubbed at triton's cache-hit work (in a subprocess: the interpreter must be off): each
step's launches (kernel, triton's specialisation, grid, every argument: a number's value, a
tensor's dtype, shape, strides, offset, which module state or input it is, which other
argument of the launch it shares memory with) and its other aten compute ops, with plans
and without, side by side, through alignments, deterministic algorithms, the statistics
atomics' semantics and loss terms that share a gradient or not; and plans that forget what
a launch depends on are caught."""

import ast
import textwrap

import pytest

from _util import run_uninterpreted

SCRIPT = textwrap.dedent('''
    import contextlib
    import sys
    import torch
    from benchmarks import host
    from vqfast.kernels import _launch, _plan
    from vqfast.ops import lfq as lfq_ops

    mode, only = sys.argv[1], set(sys.argv[2:])  # (only these cases, when named)
    key_of = _plan.key_of
    if mode == "no alignment":  # a key that forgets the inputs' 16-byte alignment
        _plan.key_of = lambda args: key_of([
            torch.empty_strided(a.shape, a.stride(), dtype=a.dtype)
            if isinstance(a, torch.Tensor) else a for a in args])
    elif mode == "no aliasing":  # ... which argument is another one
        _plan.key_of = lambda args: key_of([a.detach() if isinstance(a, torch.Tensor) else a
                                            for a in args])
    elif mode == "no deterministic flag":  # ... torch.use_deterministic_algorithms
        _plan.key_of = lambda args: (lambda key: key and key[1:])(key_of(args))
    elif mode == "no atomics' semantics":  # ... the statistics atomics' memory semantics
        _plan.key_of = lambda args: (lambda key: key and key[:1] + key[2:])(key_of(args))
    elif mode == "zeros as empty":  # zeroed buffers replayed without their zeros
        _plan._ALLOCATIONS = _plan._ALLOCATIONS | _plan._ZEROS

    log, roles, fresh, seen = [], {}, {}, []
    replays = [0]
    replay = _plan._Plan.replay

    def counted(self, args):
        replays[0] += 1
        return replay(self, args)
    _plan._Plan.replay = counted

    def describe(args):
        ptrs, out = [], []
        for a in args:
            if isinstance(a, torch.Tensor):
                ptr = a.untyped_storage().data_ptr() if a.untyped_storage().nbytes() else None
                shared = ptrs.index(ptr) if ptr is not None and ptr in ptrs else None
                ptrs.append(ptr)
                # module state and inputs by name, the step's new tensors in order of use
                # (each kept until the step ends: no other tensor takes its memory meanwhile)
                seen.append(a)
                role = roles.get(ptr) or (fresh.setdefault(ptr, f"new #{len(fresh)}")
                                          if ptr is not None else "empty")
                out.append((str(a.dtype), tuple(a.shape), a.stride(), a.storage_offset(),
                            role, shared))
            else:
                ptrs.append(None)
                out.append(a)
        return tuple(out)

    def run(self, g0, g1, g2, stream, function, metadata, launch_metadata, enter, leave, *args):
        log.append((self.name, self.key, (g0, g1, g2), describe(args)))
        self.launches.launched(self.name, self.key, args)

    host._Compiled.run = run

    @contextlib.contextmanager
    def switches(deterministic, semantics):
        torch.use_deterministic_algorithms(deterministic)
        _launch.STATS_SEM = semantics
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(False)
            _launch.STATS_SEM = "relaxed"

    def record(module, x, step, result, key):
        del log[:], seen[:]
        fresh.clear()
        roles.clear()
        for label, t in [*module.state_dict(keep_vars=True).items(), ("x", x)]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                roles[t.untyped_storage().data_ptr()] = label
        counting = host._CountOps()
        with counting:
            step()
        x.grad = None
        result[key] = (list(log), dict(counting.ops))

    def lfq_step(x, weight):
        # LFQ's terms' gradients: one tensor for both (a plain sum), or two
        q, commitment, entropy, _, _ = lfq_ops.lfq_quantize(x, 1.0, 0.25, 0.1, 100.0, "triton")
        total = commitment + (entropy if weight is None else weight * entropy)
        torch.autograd.backward((q, total), (torch.ones_like(q), torch.ones_like(total)))

    # (offset of x: 16-byte aligned or not; deterministic algorithms; atomics' semantics)
    TURNS = [(0, False, "relaxed"), (1, False, "relaxed"), (0, True, "relaxed"),
             (0, False, "acq_rel"), (0, False, "relaxed")]

    def steps(plans):
        # per case, turn and step: (launches, other compute ops); the replays per case
        _plan.PLANS = plans
        result, replayed = {}, {}
        launches = host.StubbedLaunches()
        with launches.stubbed():
            for name, build, shape, kind in host._cases():
                if kind != "vqfast" or (only and name not in only):
                    continue
                torch.manual_seed(0)
                module = build("torch").train()
                replays[0] = 0
                for turn, (offset, deterministic, semantics) in enumerate(TURNS):
                    x = torch.randn(torch.Size(shape).numel() + offset)[offset:].view(shape)
                    x.requires_grad_(True)
                    host._step(module, x, [None, None])  # (k-means init on the torch path)
                    host._set_backend(module, "triton")
                    with switches(deterministic, semantics):
                        for step in range(3):
                            record(module, x, lambda: host._step(module, x, [None, None]),
                                   result, (name, turn, step))
                    host._set_backend(module, "torch")
                replayed[name] = replays[0]
            torch.manual_seed(0)
            x = torch.randn(2, 10, 16, requires_grad=True)
            for step, weight in enumerate((None, None, None, 0.1, 0.1, None)):
                record(torch.nn.Module(), x, lambda: lfq_step(x, weight), result,
                       ("LFQ's terms, one gradient or two", 0, step))
        return result, replayed

    (own, _), (planned, replayed) = steps(False), steps(True)
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
    print(replayed)
    print(len(own))
''')


def _run(mode, *cases):
    return run_uninterpreted(SCRIPT, mode, *cases)


# Each blind key's case (besides LFQ's terms with one gradient or two, which every run steps)
BLIND = {"no alignment": "VectorQuantizerEMA (defaults)",
         "no aliasing": "SimVQ",  # (LFQ's terms catch it)
         "no deterministic flag": "VectorQuantizerEMA (defaults)",
         "no atomics' semantics": "VectorQuantizerEMA (defaults)",
         "zeros as empty": "LFQ (d = 10)"}


@pytest.mark.slow
def test_replayed_plans_launch_what_the_ops_launch():
    result = _run("real")
    assert result.returncode == 0, result.stderr[-3000:]
    replayed, steps = result.stdout.strip().splitlines()[-2:]
    replayed = ast.literal_eval(replayed)
    assert int(steps) >= 170
    # every quantizer's step replays plans (of all its ops but those that fill, copy or
    # reduce besides their launches)
    assert all(count > 0 for count in replayed.values()), replayed
    # its 3 ops: a key's third call replays; the last turn's keys are the first's
    assert replayed["VectorQuantizerEMA (defaults)"] >= 3 * (1 + 1 + 1 + 3), replayed


@pytest.mark.slow
@pytest.mark.parametrize("blind_to", list(BLIND))
def test_a_plan_blind_to_what_a_call_depends_on_is_caught(blind_to):
    result = _run(blind_to, BLIND[blind_to])
    assert result.returncode != 0
    assert "steps differ" in result.stderr, result.stderr[-3000:]
