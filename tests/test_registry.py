"""The shared tests of every quantizer, over the registry of ``tests/_specs.py``: a new
quantizer gets them by its spec, with no list here to edit. Each family's own file holds
its oracle tests; this one holds what every quantizer promises alike."""

import copy
from pathlib import Path

import pytest
import torch

import vqfast
from vqfast import reference
from vqfast.quantizer_base import QuantizerCommon
from _specs import SPECS
from _util import BACKENDS, tensor_state
from test_no_sync import HostReads

IDS = [spec.name for spec in SPECS]


def test_every_quantizer_has_a_spec_with_an_oracle():
    """A quantizer exported by ``vqfast`` without a spec fails here, naming it; so does a
    spec whose oracle is not in ``vqfast.reference`` or is never used by its test file."""
    exported = [getattr(vqfast, name) for name in vqfast.__all__]
    quantizers = {c for c in exported if isinstance(c, type) and issubclass(c, QuantizerCommon)}
    missing = sorted(c.__name__ for c in quantizers - {spec.cls for spec in SPECS})
    assert not missing, f"no spec in tests/_specs.py for {missing}"
    for spec in SPECS:
        assert hasattr(reference, spec.oracle), f"{spec.name}: no vqfast.reference.{spec.oracle}"
        assert callable(getattr(reference, spec.oracle)), (  # (not a family module's name)
            f"{spec.name}: vqfast.reference.{spec.oracle} is not a function")
        tests = (Path(__file__).parent / spec.oracle_tests).read_text()
        assert f"reference.{spec.oracle}" in tests, (
            f"{spec.name}: {spec.oracle_tests} never compares it with reference.{spec.oracle}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_encode_is_the_eval_forward_and_decodes_to_its_output(spec, backend):
    torch.manual_seed(0)
    module = spec.build(backend)
    x = spec.inputs()
    module.train()(x)  # (k-means, where it has one)
    outputs = module.eval()(x)
    codes = module.encode(x)
    assert torch.equal(codes, spec.codes(outputs))
    torch.testing.assert_close(module.decode_indices(codes), spec.quantized(outputs).float(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_a_trained_state_round_trips(spec):
    """After a training step the state_dict loads into a fresh module, which then gives
    the same eval output and codes."""
    torch.manual_seed(0)
    module = spec.build("torch")
    x = spec.inputs()
    spec.training_loss(module.train()(x.clone().requires_grad_())).backward()
    if spec.learned:
        with torch.no_grad():  # (a learned state moves by its optimizer)
            for p in module.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
    torch.manual_seed(1)
    fresh = spec.build("torch")
    fresh.load_state_dict(module.state_dict())
    want, got = module.eval()(x), fresh.eval()(x)
    assert torch.equal(spec.codes(got), spec.codes(want))
    torch.testing.assert_close(spec.quantized(got), spec.quantized(want))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_bad_input_raises_and_leaves_the_state(spec):
    """Inputs with the wrong channel count (``ValueError``) or a non-float dtype
    (``TypeError``) raise before anything changes, in training mode too."""
    torch.manual_seed(0)
    module = spec.build("torch").train()
    before = copy.deepcopy(tensor_state(module))
    for bad in (torch.randn(2, spec.channels + 1, 5, 5),
                torch.ones(2, spec.channels, 5, 5, dtype=torch.int64)):
        with pytest.raises(TypeError if bad.dtype == torch.int64 else ValueError):
            module(bad)
    after = tensor_state(module)
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_a_training_step_reads_nothing_on_the_host(spec, backend):
    """Forward, backward and the module's own state update, after a first step (k-means),
    dispatch no op that waits for the device (``tests/test_no_sync.py``)."""
    torch.manual_seed(0)
    module = spec.build(backend).train()

    def step():
        x = spec.inputs().requires_grad_()
        spec.training_loss(module(x)).backward()
        return x

    step()
    with HostReads() as recorder:
        x = step()
    assert recorder.found == [], recorder.found
    assert bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("package", ["vqfast.reference", "vqfast._torch"])
def test_self_building_namespaces_export_each_name_once(package):
    """``vqfast.reference`` and ``vqfast._torch`` export their family modules' public
    names: a name defined in two families would silently shadow the other, and a family
    module named as a name it exports would be replaced by it."""
    import importlib
    import inspect
    import pkgutil
    root = importlib.import_module(package)
    owners = {}
    for info in pkgutil.iter_modules(root.__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        for name, obj in vars(module).items():
            if (not name.startswith("_") and inspect.isfunction(obj)
                    and obj.__module__ == module.__name__):
                assert name not in owners, f"{package}: {name} in {owners.get(name)} and {info.name}"
                owners[name] = info.name
    clashes = sorted(info.name for info in pkgutil.iter_modules(root.__path__)
                     if info.name in owners)
    assert not clashes, f"{package}: family modules named as a function they export: {clashes}"
