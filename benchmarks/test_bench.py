"""pytest-benchmark cases for the suite's ops at the VQ-VAE shape (N=16384, D=64, K=512).

``python -m pytest benchmarks --benchmark-enable`` measures; the default test run calls
each case once as a smoke test (``--benchmark-disable`` in pyproject's addopts).
"""

import dataclasses

import pytest
import torch

from benchmarks import suite
from benchmarks.suite import environment

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = [i for i in suite.IMPLS if i != "vqfast[triton]" or DEVICE.type == "cuda"]


CASES = [(op, impl) for op in suite.OPS for impl in IMPLS
         if not (op == "nearest" and impl == "vector-quantize-pytorch")]  # it has no such op


@pytest.mark.parametrize("op,impl", CASES)
def test_seed_shape(benchmark, op, impl):
    try:
        fn = suite.make_case(impl, op, suite.SEED, DEVICE, torch.float32)
    except suite.Skip as reason:
        pytest.skip(str(reason))
    if DEVICE.type == "cuda":
        run = fn
        fn = lambda: (run(), torch.cuda.synchronize())  # noqa: E731
    benchmark(fn)


def test_residual_speedups_pair_rows_of_the_same_arithmetic(monkeypatch):
    """The residual benchmark at a tiny size with the CUDA-only TF32 pair forced in (their
    ``precision="tf32"`` / ``allow_tf32`` run as fp32 on CPU): every row ran, and each
    speedup is against the peer row of its own arithmetic."""
    pytest.importorskip("vector_quantize_pytorch")
    from benchmarks import residual
    monkeypatch.setattr(residual, "IMPLS", {**residual.IMPLS, **residual.CUDA_IMPLS})
    case = dataclasses.replace(residual.QUICK[0], n=64, k=16)
    rows = residual.run([case], torch.device("cpu"), progress=lambda line: None)
    assert [r.impl for r in rows] == list(residual.IMPLS)
    assert all(r.skipped is None and r.median_ms > 0 for r in rows), rows
    by_impl = {r.impl: r for r in rows}
    for impl, peer in (("vqfast", residual.PEER), ("vqfast (tf32)", f"{residual.PEER} (tf32)")):
        expected = by_impl[peer].median_ms / by_impl[impl].median_ms
        assert by_impl[impl].speedup_vs_peer == pytest.approx(expected)
    assert torch.backends.cuda.matmul.allow_tf32 is False  # restored after the peer's steps


def test_encode_benchmark_rows_agree_on_the_codes():
    """The encode benchmark at a tiny size: every implementation ran, and vqfast's encode
    and eval-mode forward return the same codes (what the benchmark times is the same work)."""
    from benchmarks import encode
    case = dataclasses.replace(encode.QUICK[0], n=64, k=16)
    rows = encode.run([case], torch.device("cpu"), progress=lambda line: None)
    assert [r.impl for r in rows] == list(encode.IMPLS)
    for r in rows:
        assert r.skipped is None or r.skipped.startswith("vector-quantize-pytorch"), r.skipped
        if r.median_ms:
            assert r.vectors_per_s == pytest.approx(64 / (r.median_ms / 1e3)) and r.peak_mib >= 0
    x = torch.randn(case.shape)
    module, encode_fn = encode.setup_encode(case)
    module.eval()
    torch.manual_seed(0)
    forward_module, forward_fn = encode.setup_forward(case)
    forward_module.load_state_dict(module.state_dict())
    forward_module.eval()
    assert torch.equal(encode_fn(x), forward_fn(x))


def test_sim_vq_benchmark_runs_both_sides():
    from benchmarks import sim_vq
    case = dataclasses.replace(sim_vq.QUICK[0], n=256, k=16)
    rows = sim_vq.run([case], torch.device("cpu"), progress=lambda line: None)
    assert [r.impl for r in rows] == ["vqfast", sim_vq.PEER]
    assert rows[0].median_ms and rows[0].peak_mib >= 0
    assert rows[1].median_ms or rows[1].skipped.endswith("not installed")


def test_ibq_benchmark_streams_and_skips_what_would_not_fit():
    from benchmarks import ibq
    small, large = ibq.Case(64, 8, 32), ibq.Case(64, 8, 4096)
    rows = ibq.run([small, large], torch.device("cpu"),
                   budget_bytes=ibq.PLAIN_TENSORS * 64 * 1024 * 4, progress=lambda line: None)
    assert [r.impl for r in rows] == ["vqfast (streamed)", ibq.PLAIN] * 2
    assert rows[1].median_ms and rows[0].speedup_vs_plain
    assert rows[3].skipped.startswith("needs ~") and rows[2].median_ms


def test_residual_lookup_free_benchmark_runs_both_sides():
    from benchmarks import residual_lookup_free as rlf
    cases = [dataclasses.replace(c, n=256) for c in rlf.QUICK]
    rows = rlf.run(cases, torch.device("cpu"), progress=lambda line: None)
    assert [r.impl for r in rows] == ["vqfast", rlf.PEER] * 2
    assert all(r.median_ms and r.peak_mib is not None for r in rows)
    assert all(r.speedup_vs_peer for r in rows)


def test_multiscale_benchmark_runs_both_sides():
    from benchmarks import multiscale
    case = dataclasses.replace(multiscale.QUICK[0], k=16, scales=(1, 2, 4), size=4)
    rows = multiscale.run([case], torch.device("cpu"), progress=lambda line: None)
    assert [r.impl for r in rows] == ["vqfast", multiscale.PLAIN]
    assert all(r.median_ms and r.speedup_vs_plain for r in rows)


def test_lookup_free_benchmark_has_a_bsq_row_with_the_exact_entropy():
    from benchmarks import lookup_free
    rows = lookup_free.lfq_cases([6], 128, torch.device("cpu"), progress=lambda line: None,
                                 kind="bsq")
    ours = next(r for r in rows if r.impl == "vqfast (exact)")
    peer = next(r for r in rows if r.impl.endswith("=1.0)"))
    assert ours.quantizer == "bsq" and ours.median_ms
    assert peer.entropy_error < 1e-4  # the peer's unsampled entropy is the exact one


def test_patched_benchmark_runs_at_tiny_sizes_with_equal_codes():
    """``python -m benchmarks.patched --quick``: every installed library's case runs, the
    patched module's codes equal the original's, and the table has a row per case."""
    from benchmarks import patched
    rows = patched.run(quick=True, progress=lambda *_: None)
    assert len(rows) == len(patched.CASES)
    ran = [r for r in rows if not r.skipped]
    assert ran, "no library of the benchmark is installed"
    assert all(r.codes_equal and r.patched_modules > 0 for r in ran), ran
    assert "| case |" in patched.markdown(environment(torch.device("cpu")), rows)


def test_codecs_benchmark_runs_at_tiny_sizes_with_equal_codes():
    """``python -m benchmarks.codecs --quick``: each installed codec's quantizer and its
    ``ResidualVQ`` give the same codes; an encode and a training step row per case."""
    from benchmarks import codecs
    rows = codecs.run(quick=True, progress=lambda *_: None)
    assert len(rows) == 2 * len(codecs.CASES)
    ran = [r for r in rows if not r.skipped]
    assert ran, "no codec library of the benchmark is installed"
    assert all(r.codes_equal for r in ran if r.kind == "encode"), ran
    assert all(r.vqfast_ms > 0 and r.original_ms > 0 for r in ran)
    assert "| case | step |" in codecs.markdown(environment(torch.device("cpu")), rows)


def test_reports_without_matplotlib_keep_every_number(tmp_path, monkeypatch, capsys):
    """A machine without matplotlib (the GPU image may lack it) gets the JSON and the
    markdown, no figure, and a line saying so."""
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = suite.Result("vqfast[torch]", "nearest", "vqvae", 16, 4, 8, "float32", median_ms=1.0,
                          peak_mib=0.5)
    env = suite.environment(torch.device("cpu"))
    paths = suite.save(env, [result], tmp_path, "bench", name="bench")
    assert paths["json"].exists() and paths["md"].exists() and "png" not in paths
    assert not (tmp_path / "bench.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().out
