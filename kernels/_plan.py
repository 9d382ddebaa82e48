"""Launch plans: an op's launches replayed without re-deriving them.

At small shapes an eager step costs what the host spends issuing it, and most of that is
not the launches but what leads to them: the launchers' checks, block-size choices, grids,
allocations and argument keys, re-derived at every call though they depend only on the
shapes, dtypes and options of the call. A plan records one call of an op (a vqfast custom
op's implementation on the Triton backend): the buffers it allocates, the launches it makes
(the compiled kernel, its grid and its arguments, each tensor named as an input of the op,
a buffer, or a view of either) and what it returns. Later calls with the same key (every
argument's type and value, or a tensor's dtype, shape, strides, device, 16-byte alignment
and which earlier argument it is, and the global switches a launcher reads) allocate those
buffers and call the compiled kernels' launchers directly.

A key's first call takes the op's own path and its second is recorded (a key seen once,
such as an annealed float argument's, is never recorded). An op is planned only where
replaying is exactly the call: a recording that runs any aten op but allocations, zeroed
allocations and views (a fill, a copy, a host read), launches anything through triton's own
path, hands over a tensor from elsewhere or takes two arguments that share memory is kept
as "never planned" for its key, and that key always takes the op's own path; so does a plan
one of whose kernels has gained a pre-run hook. ``PLANS = False`` (or the launch-key
check, ``VQFAST_CHECK_LAUNCH_KEYS=1``) turns plans off; ``_launch.forget_fast_launches()``
drops them with the fast launches they replay.
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _launch

PLANS = True
MAX_PLANS = 64  # per op: a key space this large is a sign of varying shapes
# The plans' scratch buffers by (device, stream, shape, strides, dtype, ordinal): what a
# call neither returns nor zeroes is dead once its launches are done, so one tensor of a
# geometry serves every plan on a stream (stream order keeps them apart), while one of
# them lives (weak: the plans hold them)
_SCRATCH = weakref.WeakValueDictionary()
_launch.PLAN_CACHES.append(_SCRATCH)

# What a plan can replay: fresh buffers and views of tensors.
_ALLOCATIONS = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}
_ZEROS = {"zeros", "new_zeros", "zeros_like"}
_FREE = {"detach", "alias", "lift_fresh"}


def new_plan_cache() -> dict:
    """An op's plans by call key (``_launch.forget_fast_launches`` clears them all)."""
    plans = {}
    _launch.PLAN_CACHES.append(plans)
    return plans


def planning(device: torch.device) -> bool:
    """Whether calls on ``device`` may take plans: on CUDA, with vqfast's launch path on and
    the launch-key check off (a stub of the launches, as the host-cost benchmark's, counts
    as CUDA through ``_launch.interpreted``)."""
    return (PLANS and _launch.FAST_LAUNCH and not _launch.CHECK_LAUNCH_KEYS
            and not _launch.interpreted(device))


def switches() -> tuple:
    """The global switches the launchers read (they run on the tensors' device): deterministic
    algorithms, the statistics atomics' semantics, triton's debug knob."""
    return (torch.are_deterministic_algorithms_enabled(), _launch.STATS_SEM,
            _launch._triton().knobs.runtime.debug)


def key_of(args) -> tuple | None:
    """What a call's launches depend on: each argument's type and value, a tensor's dtype,
    shape, strides, device and 16-byte alignment, and which earlier argument it is (the same
    tensor passed twice); the global switches the launchers read. ``None``: an argument a
    plan cannot key."""
    key = list(switches())
    first = {}
    for i, a in enumerate(args):
        t = type(a)
        if t is torch.Tensor or t is torch.nn.Parameter:  # (views of it keep its offset)
            key.append((a.dtype, a.shape, a.stride(), a.get_device(), a.data_ptr() & 15,
                        first.setdefault(id(a), i)))
        elif t is bool or t is int or t is float or t is str or a is None:
            key.append((t, a))
        else:
            return None
    return tuple(key)


_SEEN_ONCE = object()  # a key called once: recorded at its second call


def call(plans: dict, fn, args):
    """``fn(*args)`` (an op's implementation on the Triton backend) through ``plans``, its
    plans by call key: a key's first call runs ``fn`` (a key seen once, such as an annealed
    float's, is not worth recording), its second records a plan, later ones replay it."""
    if not planning(args[0].device) or _launch.recording.launches is not None:
        return fn(*args)  # (inside a recording, a step plan's: the op's own launches)
    key = key_of(args)
    plan = plans.get(key) if key is not None else False
    if plan.__class__ is _Plan:
        return fn(*args) if plan.hooked() else plan.replay(args)
    if plan is None:
        if len(plans) >= MAX_PLANS:
            plans.clear()
        plans[key] = _SEEN_ONCE
        return fn(*args)
    if plan is not _SEEN_ONCE:  # (False: never planned)
        return fn(*args)
    result, plan = record(fn, args)
    plans[key] = plan or False
    return result


class _Recording(TorchDispatchMode):
    """The aten ops an op's call runs: its allocations kept, anything that is not an
    allocation or a view noted (the call cannot be planned)."""

    def __init__(self):
        super().__init__()
        self.buffers = []
        self.zeroed = set()  # which buffers are zeroed as they are made
        self.refused = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _ALLOCATIONS:
            self.buffers.append(out)
        elif name in _ZEROS:  # a fresh buffer, zeroed (replayed as this same op)
            self.buffers.append(out)
            self.zeroed.add(len(self.buffers) - 1)
        elif not (func.is_view or name in _FREE) and self.refused is None:
            self.refused = name
        return out


def recorded(run):
    """``run()`` on its own path, recorded: ``(its result, a function of the arguments and
    result to plan -> their _Plan or None)`` (None: it ran another aten op, or launched
    nothing)."""
    recording = _Recording()
    launches = _launch.recording.launches = []
    try:
        with recording:
            result = run()
    finally:
        _launch.recording.launches = None

    def plan(args, returned):
        if recording.refused is not None or not launches:
            return None
        try:
            return _Plan(args, recording.buffers, recording.zeroed, launches, returned)
        except _NotPlannable:
            return None
    return result, plan


def record(fn, args):
    """Run ``fn(*args)`` as an op's own path and record it: ``(result, plan or None)``."""
    result, plan = recorded(lambda: fn(*args))
    return result, plan(args, result)


class _NotPlannable(Exception):
    pass


class _Plan:
    """One recorded call: ``replay(args)`` makes its launches and returns its result, by a
    function generated for it (allocations, views, the compiled kernels' launchers called
    with the recorded grids and constants: no per-argument interpretation at replay)."""

    __slots__ = ("device", "kernels", "_hooks", "_replay")

    def __init__(self, args, buffers, zeroed, launches, result):
        self.device = next(a.device for a in args if isinstance(a, torch.Tensor))
        self.kernels = tuple(dict.fromkeys(kernel for kernel, *_ in launches))
        # (each kernel's pre-run hooks: triton's JITFunction adds to this one list)
        self._hooks = tuple(getattr(kernel, "pre_run_hooks", ()) for kernel in self.kernels)
        inputs, storages = {}, {}
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.untyped_storage().nbytes():
                ptr = a.untyped_storage().data_ptr()
                if inputs.setdefault(ptr, i) != i and a is not args[inputs[ptr]]:
                    raise _NotPlannable  # two arguments share memory: whose view is whose?
        for j, b in enumerate(buffers):
            if b.device != self.device:
                raise _NotPlannable
            if b.untyped_storage().nbytes():
                storages.setdefault(b.untyped_storage().data_ptr(), j)
        single = not isinstance(result, tuple)
        outs = (result,) if single else result
        if any(o is not None and not isinstance(o, torch.Tensor) for o in outs):
            raise _NotPlannable
        # What each returned buffer is returned as (itself, or views of it). The others,
        # scratch (unless zeroed), and the views of them, are taken once per stream from the
        # shared ``_SCRATCH``. A buffer returned once, whole, in another contiguous shape is
        # made in that shape (a launch takes a tensor's data pointer alone: its shape and
        # strides, where a kernel needs them, are arguments of their own)
        returned_as = {}
        for o in outs:
            j = storages.get(o.untyped_storage().data_ptr()) if o is not None else None
            if j is not None:
                returned_as.setdefault(j, []).append(o)
        geometry_of = {j: (tuple(b.shape), b.stride()) for j, b in enumerate(buffers)}
        for j, (o, *more) in returned_as.items():
            b = buffers[j]
            if not more and j not in zeroed and o.dtype == b.dtype and o.numel() == b.numel() \
                    and o.storage_offset() == 0 and o.is_contiguous() and b.is_contiguous():
                geometry_of[j] = (tuple(o.shape), o.stride())
        names = {}  # a constant's id -> its name in the generated function's globals
        scope = {"empty_strided": torch.empty_strided, "zeros": torch.zeros,
                 "device": self.device, "scratch": {}}
        body, allocated, views, empties = [], {}, {}, []
        scratch = []  # (name, buffer index or (base name, geometry))

        def constant(value):
            name = names.get(id(value))
            if name is None:
                name = names[id(value)] = f"c{len(names)}"
                scope[name] = value
            return name

        def allocate(name, t, geometry=None, zeroed=False):
            """``name = `` a new tensor of ``t``'s dtype, in ``geometry`` (its shape and
            strides, default ``t``'s; zeroed: as ``torch.zeros``)."""
            shape, stride = geometry or (tuple(t.shape), t.stride())
            if zeroed and not t.is_contiguous():
                raise _NotPlannable
            size, dtype = constant(shape), constant(t.dtype)
            body.append(f"{name} = zeros({size}, dtype={dtype}, device=device)" if zeroed else
                        f"{name} = empty_strided({size}, {constant(stride)}, "
                        f"dtype={dtype}, device=device)")
            return name

        def buffer(j):
            name = allocated.get(j)
            if name is None:
                if j in returned_as or j in zeroed:
                    name = allocated[j] = allocate(f"b{j}", buffers[j], geometry_of[j],
                                                   j in zeroed)
                else:
                    name = allocated[j] = f"b{j}"
                    scratch.append((name, j))
            return name

        def view(base, base_name, t, relative, pointer, base_geometry=None):
            """``t`` as a view of ``base`` (named ``base_name``, made in ``base_geometry``);
            ``pointer``: a launch's argument (its data pointer alone matters)."""
            if t.dtype != base.dtype:
                raise _NotPlannable
            geometry = (tuple(t.shape), t.stride(), t.storage_offset() - base.storage_offset())
            if geometry == (*(base_geometry or (tuple(base.shape), base.stride())), 0) \
                    or pointer and geometry[2] == 0:
                return base_name
            offset = (f"{base_name}.storage_offset() + {geometry[2]}" if relative
                      else str(geometry[2]))
            expression = (f"{base_name}.as_strided({constant(geometry[0])}, "
                          f"{constant(geometry[1])}, {offset})")
            name = views.get(expression)
            if name is None:
                name = views[expression] = f"v{len(views)}"
                if any(base_name == s for s, _ in scratch):  # (a scratch buffer's: made once)
                    scratch.append((name, (base_name, geometry)))
                else:
                    body.append(f"{name} = {expression}")
            return name

        def tensor(t, pointer=False):
            """The expression of tensor ``t``: an input of the op, a buffer, a view of one
            (``pointer``: a launch's argument, any tensor at its address)."""
            if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
                raise _NotPlannable
            for i, a in enumerate(args):
                if t is a:
                    return f"args[{i}]"
            if not t.untyped_storage().nbytes():  # no memory: any tensor of its geometry
                empties.append(t)
                return allocate(f"e{len(empties)}", t)
            # a buffer, or a view of one, found by its memory (the recording's tensors are
            # other Python objects than the op's); fresh buffers start at offset 0
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages:
                j = storages[ptr]
                return view(buffers[j], buffer(j), t, False, pointer, geometry_of[j])
            if ptr in inputs:
                i = inputs[ptr]
                return view(args[i], f"args[{i}]", t, True, pointer)
            raise _NotPlannable  # a tensor from elsewhere

        for n, (kernel, grid, launch_args, key) in enumerate(launches):
            entry = (kernel.__dict__.get("_vqfast_launches", {}).get(key)
                     if key is not None else None)
            if not entry or getattr(kernel, "pre_run_hooks", None):
                raise _NotPlannable
            full = [tensor(a, pointer=True) if isinstance(a, torch.Tensor) else constant(a)
                    for a in launch_args]
            full += [constant(a) for a in entry.tail]
            grid = (*grid, 1, 1)[:3]
            compiled = entry.compiled
            scope[f"k{n}"] = compiled
            head = (f"k{n}.run({grid[0]}, {grid[1]}, {grid[2]}, stream, "
                    f"{constant(compiled.function)}, {constant(compiled.packed_metadata)}, ")
            # (without a launch hook, as most calls: the arguments passed as they are)
            body += ["if enter is None:", f"    {head}None, None, leave, {', '.join(full)})",
                     "else:", f"    a{n} = ({', '.join(full)},)",
                     f"    {head}k{n}.launch_metadata({constant(grid)}, stream, *a{n}), enter, "
                     f"leave, *a{n})"]
        returned = ["None" if o is None else tensor(o) for o in outs]
        body.append(f"return {returned[0]}" if single else f"return ({', '.join(returned)},)")
        if scratch:  # (``where``: the stream, or None while a CUDA graph is captured)
            scope["new_scratch"] = self._scratch_maker(scratch, buffers, scope["scratch"])
            body[:0] = ["s = scratch.get(where)", "if s is None:",
                        "    s = new_scratch(where)",
                        f"{', '.join(name for name, _ in scratch)}, = s"]
        source = "def replay(args, stream, enter, leave, where):\n" + "".join(
            f"    {line}\n" for line in body)
        exec(compile(source, f"<vqfast plan: {len(launches)} launches>", "exec"), scope)
        self._replay = scope["replay"]

    def _scratch_maker(self, scratch, buffers, kept):
        """``new_scratch(stream)``: the plan's scratch tensors on ``stream`` (kept per stream
        in ``kept``; ``None``, while a CUDA graph is captured: made for the call alone, in
        the graph's memory), each buffer shared with every plan's of its geometry on the
        stream (``_SCRATCH``) and each view made once."""
        device, specs, seen = self.device, [], {}
        for name, what in scratch:
            if isinstance(what, int):
                b = buffers[what]
                geometry = (tuple(b.shape), b.stride(), b.dtype)
                specs.append((name, (*geometry, seen.setdefault(geometry, 0))))
                seen[geometry] += 1  # (two scratch buffers of one geometry: two tensors)
            else:
                specs.append((name, what))

        def new_scratch(stream):
            capturing = stream is None
            made = {}
            for name, spec in specs:
                if isinstance(spec[0], str):  # a view of a scratch buffer
                    base, (shape, stride, offset) = made[spec[0]], spec[1]
                    made[name] = base.as_strided(shape, stride, base.storage_offset() + offset)
                    continue
                shape, stride, dtype, ordinal = spec
                key = (device, stream, shape, stride, dtype, ordinal)
                t = None if capturing else _SCRATCH.get(key)
                if t is None:
                    t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
                    if not capturing:
                        _SCRATCH[key] = t
                made[name] = t
            tensors = tuple(made.values())
            if not capturing:
                kept[stream] = tensors
            return tensors
        return new_scratch

    def hooked(self) -> bool:
        """Whether one of its kernels has gained a pre-run hook (which sees triton's own
        launch: the op's own path runs)."""
        return any(self._hooks)

    def replay(self, args):
        knobs = _launch._triton().knobs
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        device = self.device
        # (a graph being captured takes scratch of its own: shared scratch would be baked
        # into it, used by its replays on any stream)
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if _launch._other_cuda_device(device):
            with torch.cuda.device(device):
                stream = _launch._current_stream(device.index)
                return self._replay(args, stream, enter, leave, None if capturing else stream)
        stream = _launch._current_stream(_launch._current_device())
        return self._replay(args, stream, enter, leave, None if capturing else stream)
