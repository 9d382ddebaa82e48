"""Step plans: a quantizer module's whole forward replayed as one launch plan.

Launch plans (``vqfast.kernels._plan``) take the launchers' work out of each op call. At
small shapes a training step also pays for what lies between its ops: the module's checks
of its inputs and options, each op call's key, the update's glue, the outputs' views. None
of it changes between steps while the inputs' geometry and the module stay as they are.

A step plan records one forward of a module on the Triton backend: every launch in order,
over the flattened inputs and the module's parameters and buffers, as one ``_Plan``; the
module's outputs, each an output of the autograd node the forward made, another tensor the
launches wrote, or a view of either; what the node saved for its backward. It replays them
behind one check: the inputs' geometry and ``requires_grad``, the grad mode, the module's
training flag, the switches op plans key on, the module's attributes (its ``__dict__``,
compared whole) and its parameters and buffers (the same tensors at the same addresses,
with the same ``requires_grad``). The replayed node's backward is the recorded node's own
(``Function.backward`` on what the replay saved, with the recorded attributes).

A forward is planned only where replaying it is exactly the forward: one whose aten ops
are all allocations and views (with a mask, cosine codes, projections, a collapse watch or
finite checks a module runs other ops: it keeps its own path) and whose differentiable
outputs come from one node of the ``Function`` the module names. As with op plans, a key's
first call takes the module's own path, its second is recorded and later ones replay; a
module changed since (an attribute set, a tensor replaced or moved) starts over.
``STEP_PLANS = False`` turns them off (op plans stay), ``vqfast.kernels._plan.PLANS =
False`` turns both off; ``_launch.forget_fast_launches()`` drops them too.
"""

import functools
import inspect
import weakref

import torch
import torch.distributed as dist

from .dispatch import _plan

STEP_PLANS = True  # (off: each op's call takes its own launch plan, ``kernels._plan``)
_REFUSED = "refused"  # recorded, and not plannable: the module's own path


class _Steps:
    """A module's step plans by call key (``by_key``), in its ``__dict__``
    (``_step_plans``): copies and pickles of the module start without them."""

    __slots__ = ("by_key", "__weakref__")

    def __init__(self):
        self.by_key = {}

    def clear(self):
        self.by_key.clear()

    def __reduce__(self):
        return _no_steps, ()

    def __deepcopy__(self, memo):
        return None


def _no_steps():
    """A copy's step plans: none yet (its first call makes them)."""
    return None


class _AllSteps(weakref.WeakSet):
    """Every module's ``_Steps``: ``_launch.forget_fast_launches()`` clears them all."""

    def clear(self):
        for steps in list(self):
            steps.clear()


@functools.cache
def _all_steps() -> _AllSteps:
    steps = _AllSteps()
    _plan()._launch.PLAN_CACHES.append(steps)
    return steps


def call(module, inputs, own, function):
    """``module``'s forward of ``inputs``: ``own(inputs)`` (its own path), or its step plan.

    ``module._flat_shape(inputs)``: the view of ``inputs`` its ops take (``[B, C, -1]``);
    ``function``: the ``torch.autograd.Function`` whose node the forward makes (it must not
    materialise gradients: ``ctx.set_materialize_grads(False)``)."""
    if not STEP_PLANS or type(inputs) is not torch.Tensor or torch.compiler.is_compiling() \
            or torch._C._are_functorch_transforms_active() or not inputs.is_contiguous():
        return own(inputs)  # (non-contiguous inputs: the own path copies them)
    backend, device = module.backend, inputs.device
    if not (backend == "triton" or backend == "auto" and device.type == "cuda") \
            or not _plan().planning(device):
        return own(inputs)
    key = key_of(module, inputs, device)
    attributes = module.__dict__
    steps = attributes.get("_step_plans")
    if steps is None:
        module._step_plans = _Steps()
        _all_steps().add(module._step_plans)
        steps = module._step_plans.by_key
    else:
        steps = steps.by_key
    state = (*attributes["_parameters"].values(), *attributes["_buffers"].values())
    entry = steps.get(key)
    if entry is None or not entry.fits(attributes, state):
        if len(steps) >= _plan().MAX_PLANS:
            steps.clear()
        steps[key] = _Step(attributes, state)  # seen once (or the module changed)
        return own(inputs)
    if entry.replay is not None:
        if entry.replay.plan.hooked():  # (a kernel's pre-run hook sees triton's own launch)
            return own(inputs)
        return entry.replay(inputs, state)
    if entry.refused:
        return own(inputs)
    outputs, plan_of = _plan().recorded(lambda: own(inputs))
    # (a recording that changed the module is not kept)
    if entry.fits(module.__dict__, (*module._parameters.values(), *module._buffers.values())):
        entry.plan(outputs, plan_of, inputs, module._flat_shape(inputs), state, function)
    else:
        del steps[key]
    return outputs


def _assembler(expressions, arguments, single):
    """A function of ``arguments`` returning ``expressions`` (one, or their tuple)."""
    body = expressions[0] if single else f"({', '.join(expressions)},)"
    return eval(f"lambda {arguments}: {body}")


def key_of(module, inputs, device) -> tuple:
    """What a step's launches depend on besides the module itself (``_Step.fits``): the
    inputs' geometry, 16-byte alignment and ``requires_grad``, the grad mode, the module's
    training flag and the switches op plans key on."""
    return (module.training, inputs.shape, inputs.stride(), inputs.dtype, device,
            inputs.data_ptr() & 15, inputs.requires_grad, torch.is_grad_enabled(),
            _distributed(), *_plan().switches())


def _distributed() -> bool:
    """Whether ``torch.distributed`` is initialised (modules that sync statistics do so then)."""
    return dist.is_available() and dist.is_initialized()


class _Step:
    """One module's step at one call key: the module as it was (``fits``), then its plan
    (``replay(inputs, state)``), or refused."""

    __slots__ = ("attributes", "state", "addresses", "grads", "replay", "refused")

    def __init__(self, attributes, state):
        self.attributes = dict(attributes)
        tensors = all(isinstance(t, torch.Tensor) for t in state)
        # (weakly: a module moved elsewhere, under another key, frees its old tensors)
        self.state = tuple(weakref.ref(t) for t in state) if tensors else ()
        self.addresses = tuple(t.data_ptr() for t in state) if tensors else None
        self.grads = tuple(t.requires_grad for t in state) if tensors else None
        self.replay = None
        # (a tensor attribute or a missing buffer: nothing to compare or pass; not planned)
        self.refused = not tensors or any(isinstance(v, torch.Tensor)
                                          for v in self.attributes.values())

    def fits(self, attributes, state) -> bool:
        """Whether the module is as it was: its attributes, and the same parameters and
        buffers at the same addresses with the same ``requires_grad``."""
        if len(state) != len(self.state) or self.addresses is None:
            return False
        for t, mine, address, grad in zip(state, self.state, self.addresses, self.grads):
            if t is not mine() or t.data_ptr() != address or t.requires_grad != grad:
                return False
        try:
            return attributes == self.attributes
        except Exception:  # (an attribute set to a tensor or an array: compared as one)
            return False

    def plan(self, outputs, plan_of, inputs, flat_shape, state, function) -> None:
        """Build the replay of a recorded forward of ``inputs`` (``outputs``; ``plan_of``:
        its recording's ``_plan.recorded`` planner; ``flat_shape``: the view of the inputs
        its ops took), or refuse."""
        self.refused = True
        replay = _Replay.of(outputs, plan_of, inputs, flat_shape, state, function)
        if replay is not None:
            self.replay, self.refused = replay, False


class _Replay:
    """A recorded forward: its plan, the recipe of its outputs, and its autograd node's
    (what it saved, its attributes, its backward's own plans)."""

    __slots__ = ("plan", "flat_shape", "single", "recipe", "assemble", "node_shapes",
                 "node_outputs", "codebook", "saved", "saved_inputs", "constants",
                 "tensor_attributes", "function", "unused_grads", "backwards")

    @classmethod
    def of(cls, outputs, plan_of, inputs, flat_shape, state, function):
        """The replay of ``outputs`` (a tensor or a tuple of tensors and Nones), or None."""
        x = inputs.view(flat_shape)
        replay = cls()
        replay.single = not isinstance(outputs, tuple)
        outputs = (outputs,) if replay.single else outputs
        recipe, results, node, views, node_views = [], [], None, {}, {}
        for o in outputs:
            if o is None:
                recipe.append(None)
                continue
            if type(o) is not torch.Tensor:
                return None
            base = o if o._base is None else o._base
            if base is not o and (o.storage_offset() != base.storage_offset() or not
                                  (base.is_contiguous() and o.is_contiguous())):
                return None  # (a view other than a reshape of its base)
            shape = None if base is o else tuple(o.shape)
            fn = base.grad_fn
            if fn is None and base.requires_grad:
                return None  # (a leaf: the inputs or a parameter handed back)
            if fn is None:
                recipe.append((False, len(results), shape))
                results.append(base)
                continue
            if not isinstance(fn, function._backward_cls) or node not in (None, fn) \
                    or views.setdefault(base.output_nr, (base, shape)) != (base, shape):
                return None  # (another node's, or one output seen in two shapes)
            node = fn
            node_views.setdefault(base.output_nr, o)
            recipe.append((True, base.output_nr, None))
        replay.recipe, replay.function, replay.flat_shape = recipe, function, tuple(x.shape)
        replay.saved = None
        if node is not None:
            count = len(views)
            if set(views) != set(range(count)):
                return None  # (the outputs the replay returns must be the node's first)
            edges = node.next_functions
            if len(edges) != 2 or (edges[1][0] is not None
                                   and type(edges[1][0]).__name__ != "AccumulateGrad"):
                return None  # (x and the codebook, a leaf or no gradient)
            replay.codebook = (None if edges[1][0] is None else
                               next((i for i, t in enumerate(state)
                                     if t is edges[1][0].variable), False))
            if replay.codebook is False:
                return None
            # The node's outputs as the module returns them (reshapes of them: made in that
            # shape, fresh tensors, as the module's outputs are no custom Function's views);
            # the backward's own path takes each gradient in its node output's shape
            firsts = [node_views[i] for i in range(count)]
            replay.node_shapes = [None if views[i][1] is None else tuple(views[i][0].shape)
                                  for i in range(count)]
            bases = {views[i][0].untyped_storage().data_ptr() for i in range(count)}
            if len(bases) != count or any(t.untyped_storage().data_ptr() in bases
                                          for t in (*results, *node.saved_tensors)):
                return None  # (an output of the node's seen elsewhere too)
            results = firsts + results
            replay.recipe = [part if part is None or part[0] else (False, part[1] + count, part[2])
                             for part in recipe]
            # what the node saved: the inputs themselves where it saved their flat view (the
            # backward's own path sees that view again, ``_NodeContext``), else results
            replay.saved_inputs = []
            saved = []
            for t in node.saved_tensors:
                is_x = (t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
                        and t.storage_offset() == x.storage_offset() and t.shape == x.shape
                        and t.stride() == x.stride() and t.dtype == x.dtype)
                replay.saved_inputs.append(is_x)
                saved.append("x" if is_x else f"r[{len(results)}]")
                if not is_x:
                    results.append(t)
            replay.saved = _assembler(saved, "x, r", False)
            replay.constants, replay.tensor_attributes = {}, []
            for name, value in node.__dict__.items():
                if isinstance(value, torch.Tensor):
                    replay.tensor_attributes.append((name, len(results)))
                    results.append(value)
                else:
                    replay.constants[name] = value
            replay.node_outputs = _assembler([f"r[{i}]" for i in range(count)], "r", False)
            replay.unused_grads = (
                len(inspect.signature(function.backward).parameters) - 1 - count)
            replay.backwards = {}
        plan = plan_of((inputs, *state), tuple(results))
        if plan is None:
            return None
        replay.plan = plan
        replay.assemble = _assembler(
            ["None" if part is None else
             f"{'n' if part[0] else 'r'}[{part[1]}]" + ("" if part[2] is None else
                                                        f".view({part[2]!r})")
             for part in replay.recipe], "n, r", replay.single)
        return replay

    def __call__(self, inputs, state):
        if self.saved is None:  # no autograd node (no gradient asked for)
            results = self.plan.replay((inputs, *state))
            node_outputs = ()
        else:
            sink = []
            node_outputs = _apply_replayed(
                inputs, None if self.codebook is None else state[self.codebook], self, state,
                sink)
            results = sink[0]
        return self.assemble(node_outputs, results)

    def backward(self, ctx, grads):
        """The recorded ``Function``'s backward on the replay's ``ctx`` (``grads``: of the
        outputs, in the module outputs' shapes), through a plan of its own by the gradients'
        geometry (as op plans: a key's second call records); the inputs' gradients."""
        attributes = [getattr(ctx, name) for name, _ in self.tensor_attributes]
        # (the saved and attribute tensors' geometry is the forward plan's: a fixed one;
        # the gradients are on the outputs' device, in their dtype)
        key = (*_plan().switches(), ctx.needs_input_grad, *[a is None for a in attributes],
               *[None if g is None else (g.stride(), g.data_ptr() & 15) for g in grads])
        entry = self.backwards.get(key)
        if entry.__class__ is tuple and not entry[0].hooked():
            plan, changes = entry
            result = plan.replay((*grads, *ctx.saved_tensors, *attributes))
            for name, value in changes:
                setattr(ctx, name, value)
        else:
            result = self._backward(ctx, grads, attributes, key, entry)
        return result[0], result[1]

    def _backward(self, ctx, grads, attributes, key, entry):
        """The recorded ``Function``'s own backward: at a key's first call, and recorded at
        its second."""
        def own():  # (the gradients in the node outputs' shapes; x's in the inputs')
            result = self.function.backward(_NodeContext(ctx, self), *(
                g if g is None or shape is None else g.reshape(shape)
                for g, shape in zip(grads, self.node_shapes)), *(None,) * self.unused_grads)
            grad_x = result[0]
            return None if grad_x is None else grad_x.view(ctx.inputs_shape), result[1]
        if entry is None:  # seen once (False): recorded at its next call
            if len(self.backwards) >= _plan().MAX_PLANS:
                self.backwards.clear()
            self.backwards[key] = False
            return own()
        if entry is not False:  # (refused, or a plan with a pre-run hook)
            return own()
        args = (*grads, *ctx.saved_tensors, *attributes)
        before = dict(ctx.__dict__)
        result, plan_of = _plan().recorded(own)
        changes = [(name, value) for name, value in ctx.__dict__.items()
                   if before.get(name, before) is not value]
        plan = None
        if all(not isinstance(value, torch.Tensor) for _, value in changes):
            plan = plan_of(args, tuple(result))
        self.backwards[key] = _REFUSED if plan is None else (plan, changes)
        return result


class _NodeContext:
    """A replay's ``ctx`` as the recorded node's own backward sees it: what the node saved,
    the inputs in the flat view it saved of them; everything else the replay's ``ctx``."""

    def __init__(self, ctx, replay):
        flat = replay.flat_shape
        saved = tuple(t.view(flat) if is_x else t
                      for t, is_x in zip(ctx.saved_tensors, replay.saved_inputs))
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "saved_tensors", saved)

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def __setattr__(self, name, value):
        setattr(self._ctx, name, value)


class _Replayed(torch.autograd.Function):
    """A step plan's replay as an autograd node: the recorded node's differentiable outputs
    (its first ones, in the module outputs' shapes: no view nodes), what it saved and its
    attributes; its backward is the recorded ``Function``'s (``_Replay.backward``). Inputs:
    the module's inputs, and its codebook (``None`` when it took no gradient)."""

    @staticmethod
    def forward(ctx, inputs, codebook, replay, state, sink):
        results = replay.plan.replay((inputs, *state))
        sink.append(results)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*replay.saved(inputs, results))
        ctx.__dict__.update(replay.constants)
        for name, index in replay.tensor_attributes:
            setattr(ctx, name, results[index])
        ctx.replay, ctx.inputs_shape = replay, inputs.shape
        return replay.node_outputs(results)

    @staticmethod
    def backward(ctx, *grads):
        return *ctx.replay.backward(ctx, grads), None, None, None


# ``Function.apply`` without its Python layer (default arguments bound for ``setup_context``,
# functorch's dead wrappers unwrapped: a step plan is taken only with no functorch transform
# active, and ``_Replayed`` has no ``setup_context``)
_apply_replayed = super(torch.autograd.Function, _Replayed).apply
