"""Launch plans (``vqfast.kernels._plan``): an op's recorded launches replayed must be the
launches its own path makes, for every quantizer's training step. Checked with the launches
stubbed at triton's cache-hit work (in a subprocess: the interpreter must be off): each
step's launches (kernel, triton's specialisation, grid, every argument: a number's value, a
tensor's dtype and data pointer, as the offset into which module state, input or new tensor
(a launch takes the pointer alone: shapes and strides travel as numbers), and which other
argument of the launch it shares memory with) and its other aten compute ops, with plans
and without, side by side, through alignments, deterministic algorithms, the statistics
atomics' semantics, changes to the module and loss terms that share a gradient or not; and
plans that forget what a launch depends on are caught."""

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
    from vqfast.ops import lfq as lfq_ops, step_plans

    mode, only = sys.argv[1], set(sys.argv[2:])  # (only these cases, when named)
    key_of, step_key_of, switches_of = _plan.key_of, step_plans.key_of, _plan.switches
    aligned = lambda a: torch.empty_strided(a.shape, a.stride(), dtype=a.dtype)  # noqa: E731
    if mode == "no alignment":  # keys that forget the inputs' 16-byte alignment
        _plan.key_of = lambda args: key_of([aligned(a) if isinstance(a, torch.Tensor) else a
                                            for a in args])
        step_plans.key_of = lambda module, x, device: step_key_of(
            module, aligned(x).requires_grad_(x.requires_grad), device)
    elif mode == "no aliasing":  # ... which argument is another one
        _plan.key_of = lambda args: key_of([a.detach() if isinstance(a, torch.Tensor) else a
                                            for a in args])
    elif mode == "no deterministic flag":  # ... torch.use_deterministic_algorithms
        _plan.switches = lambda: switches_of()[1:]
    elif mode == "no atomics' semantics":  # ... the statistics atomics' memory semantics
        _plan.switches = lambda: switches_of()[:1] + switches_of()[2:]
    elif mode == "no grad mode":  # ... whether the inputs take a gradient
        step_plans.key_of = lambda module, x, device: step_key_of(module, x.detach(), device)
    elif mode == "no module attributes":  # a step plan that forgets the module's options
        fits = step_plans._Step.fits
        step_plans._Step.fits = lambda self, attributes, state: fits(
            self, self.attributes, state)
    elif mode == "zeros as empty":  # zeroed buffers replayed without their zeros
        _plan._ALLOCATIONS = _plan._ALLOCATIONS | _plan._ZEROS

    log, roles, fresh, seen = [], {}, {}, []
    replays, made = [0, 0], [0]  # (plans replayed, of them whole forwards: step plans)
    replay, step_replay = _plan._Plan.replay, step_plans._Replay.__call__

    def counted_step(self, inputs, state):
        replays[1] += 1
        return step_replay(self, inputs, state)
    step_plans._Replay.__call__ = counted_step

    def counted(self, args):
        replays[0] += 1
        # a plan's scratch (what its call neither returns nor zeroes) is shared by every
        # plan on the stream: new again at each replay, as each call's own path makes it
        for t in _plan._SCRATCH.values():
            fresh.pop(t.untyped_storage().data_ptr(), None)
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
                if ptr is not None and ptr not in roles and ptr not in fresh:
                    fresh[ptr] = f"new #{made[0]}"
                    made[0] += 1
                role = roles.get(ptr) or (fresh[ptr] if ptr is not None else "empty")
                # (a launch takes a tensor's data pointer: its shape and strides, where a
                # kernel needs them, are arguments of their own, compared as numbers)
                out.append((str(a.dtype), a.storage_offset() * a.element_size(), role,
                            shared))
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
        made[0] = 0
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

    def change(module, x, what):
        """A turn's change to the module or the inputs; returns its undoing."""
        if what == "commitment_cost" and hasattr(module, "commitment_cost"):
            before = module.commitment_cost
            module.commitment_cost = 2 * before + 0.25
            return lambda: setattr(module, "commitment_cost", before)
        if what == "eval":
            module.eval()
            return module.train
        if what == "no input gradient":
            x.requires_grad_(False)
        return lambda: None

    def train_step(module, x):
        loss, q = host._loss_and_output(module(x), x)
        outputs = [t for t in (q, loss) if t is not None and t.requires_grad]
        if outputs:  # (no gradient asked for: the forward alone)
            torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])

    # (offset of x: 16-byte aligned or not; deterministic algorithms; atomics' semantics;
    # a change to the module or the inputs)
    TURNS = [(0, False, "relaxed", "no input gradient"), (0, False, "relaxed", None),
             (1, False, "relaxed", None), (0, True, "relaxed", None),
             (0, False, "acq_rel", None), (0, False, "relaxed", "commitment_cost"),
             (0, False, "relaxed", "eval"), (0, False, "relaxed", None)]

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
                replays[:] = [0, 0]
                for turn, (offset, deterministic, semantics, what) in enumerate(TURNS):
                    x = torch.randn(torch.Size(shape).numel() + offset)[offset:].view(shape)
                    x.requires_grad_(True)
                    host._step(module, x, [None, None])  # (k-means init on the torch path)
                    host._set_backend(module, "triton")
                    undo = change(module, x, what)
                    with switches(deterministic, semantics):
                        for step in range(3):
                            record(module, x, lambda: train_step(module, x), result,
                                   (name, turn, step))
                    undo()
                    host._set_backend(module, "torch")
                replayed[name] = tuple(replays)
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
         "no grad mode": "VectorQuantizerEMA (defaults)",
         "no module attributes": "VectorQuantizerEMA (defaults)",
         "zeros as empty": "LFQ (d = 10)"}


@pytest.mark.slow
def test_replayed_plans_launch_what_the_ops_launch():
    result = _run("real")
    assert result.returncode == 0, result.stderr[-3000:]
    replayed, steps = result.stdout.strip().splitlines()[-2:]
    replayed = ast.literal_eval(replayed)
    assert int(steps) >= 270
    # every quantizer's step replays plans (of all its ops but those that fill, copy or
    # reduce besides their launches)
    assert all(count > 0 for count, _ in replayed.values()), replayed
    # the single-codebook quantizers' whole forwards: a key's third call replays, in every
    # turn but the deterministic one (the EMA update's deterministic sums sort: its own
    # path; a changed module is recorded anew)
    for name in ("VectorQuantizerEMA (defaults)", "VectorQuantizer (defaults)",
                 "VectorQuantizerEMA (original algorithm)"):
        assert replayed[name][1] >= 8 - 1, replayed


@pytest.mark.slow
@pytest.mark.parametrize("blind_to", list(BLIND))
def test_a_plan_blind_to_what_a_call_depends_on_is_caught(blind_to):
    result = _run(blind_to, BLIND[blind_to])
    assert result.returncode != 0
    assert "steps differ" in result.stderr, result.stderr[-3000:]
