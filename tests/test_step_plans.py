"""Step plans (``vqfast.ops.step_plans``) at their edges, with the launches stubbed at
triton's cache-hit work (in a subprocess: the interpreter must be off): inputs a module
copies take its own path; a kernel's pre-run hook stops the replay; copies and pickles of a
module start without plans and ``forget_fast_launches`` clears theirs too; a module moved
elsewhere frees the tensors its old plans were recorded on. (What a replay launches, step
by step against the module's own path, is ``tests/test_launch_plans.py``'s.)"""

import textwrap

from _util import run_uninterpreted

SCRIPT = textwrap.dedent('''
    import copy
    import gc
    import pickle
    import weakref
    import torch
    from benchmarks import host
    from vqfast.kernels import _launch
    from vqfast.ops import step_plans
    import vqfast

    replays = [0]
    replay = step_plans._Replay.__call__

    def counted(self, inputs, state):
        replays[0] += 1
        return replay(self, inputs, state)
    step_plans._Replay.__call__ = counted

    def trained(**options):
        torch.manual_seed(0)
        module = vqfast.VectorQuantizerEMA(16, 8, backend="torch", kmeans_init=False,
                                           **options).train()
        module(torch.randn(2, 8, 4, 4) if not options else torch.randn(2, 12, 8))
        module.backend = "triton"
        return module

    def steps(module, x, n=4):
        before = replays[0]
        for _ in range(n):
            loss, q, _, _ = module(x)
            torch.autograd.backward((q, loss), (torch.ones_like(q), torch.ones_like(loss)))
        return replays[0] - before

    launches = host.StubbedLaunches()
    with launches.stubbed():
        x = torch.randn(2, 8, 4, 4, requires_grad=True)
        assert steps(trained(), x) == 2, "a contiguous input's third call replays"
        # inputs the module copies (a crop, transposed tokens): its own path, every call
        crop = torch.randn(2, 8, 4, 5, requires_grad=True)[..., :4]
        tokens = torch.randn(2, 8, 12, requires_grad=True).transpose(1, 2)
        assert steps(trained(), crop) == 0
        assert steps(trained(channel_last=True), tokens) == 0

        # a kernel that gains a pre-run hook: triton's own launch, which runs the hook
        module = trained()
        steps(module, x)
        (entry,) = module._step_plans.by_key.values()
        kernel = entry.replay.plan.kernels[0]
        kernel.add_pre_run_hook(lambda *args, **kwargs: None)
        try:
            assert steps(module, x, 2) == 0, "a hooked kernel's plan replayed"
        finally:
            kernel.pre_run_hooks.clear()
        assert steps(module, x, 1) == 1

        # copies and pickles start without plans; forgetting clears a copy's too
        for copied in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
            assert copied.__dict__.get("_step_plans") is None
            assert steps(copied, x) == 2
            _launch.forget_fast_launches()
            assert not copied._step_plans.by_key and not module._step_plans.by_key

        # a module moved (its tensors replaced, as .to(device) replaces them) frees the
        # tensors it had, and records its step anew
        module = trained()
        steps(module, x)
        old = weakref.ref(module.ema_weight)
        module._apply(lambda t: t.clone())
        gc.collect()
        assert old() is None, "a plan kept the module's old tensors alive"
        assert steps(module, x) == 2
    print("ok")
''')


def test_step_plans_at_their_edges():
    result = run_uninterpreted(SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
