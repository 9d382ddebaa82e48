#!/usr/bin/env bash
# The one command for a lent GPU: turns it into evidence in under 9 minutes on an H100.
#
#   bash benchmarks/gpu/run.sh OUT_DIR             # on the GPU machine
#   bash benchmarks/gpu/run.sh --dry-run OUT_DIR   # the same parts on CPU, tiny, for CI
#
# Installs vqfast without touching the machine's torch (pip --no-deps), and the wheels in
# ./wheels (benchmarks/gpu/fetch_wheels.sh, carried along) with --no-index; without them
# the vector-quantize-pytorch columns say it is missing. Then writes into OUT_DIR:
#   env.json              GPU, SMs, driver, CUDA, torch, triton, numpy, Python, commit
#   tests.xml, tests.log  the test suite on the device (junit + log)
#   bench.json/.md/.png   the benchmark suite (python -m benchmarks), the LFQ/FSQ
#                         benchmark (python -m benchmarks.lookup_free, d = 10..18) and the
#                         residual/grouped/cosine one (python -m benchmarks.residual)
#   train.json            VQ-VAE training step: eager / torch.compile / CUDA graph, the
#                         quantizer's share, kernel launches, a sync-debug step, and the
#                         quality benchmark's curves at batch 256 (about 150 s)
#   SUMMARY.md            what passed, the headline ratios, what failed
# A failing part is recorded and the others still run; the exit code is 0 only if every
# part passed. Uses $PYTHON if set, else python3.
set -uo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
    shift
fi
if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/gpu/run.sh [--dry-run] OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
out="$(cd "$1" && pwd)"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo" || exit 2
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

summary_args=()
failed=0
# run_part NAME SECONDS COMMAND...: run, time-limited, record the exit code, go on.
run_part() {
    local name="$1" limit="$2"
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    # SIGINT first: pytest still writes its junit file when interrupted.
    timeout -s INT -k 20 "$limit" bash -c '"$@"' "$name" "$@"
    local code=$?
    echo "=== $name: exit $code after $((SECONDS - start))s"
    summary_args+=(--part "$name=$code")
    [[ $code -eq 0 ]] || failed=1
}

install() {
    if [[ $dry_run -eq 1 ]]; then  # CI installed it already; only check the import
        "$py" -c "import vqfast; print('vqfast', vqfast.__version__, 'from', vqfast.__file__)"
        return
    fi
    "$py" -m pip install -q --no-deps --no-build-isolation -e . || return
    if compgen -G "wheels/*.whl" > /dev/null; then
        # Beside the image's packages, not over them: a folder first on PYTHONPATH.
        rm -rf "$wheel_site"
        "$py" -m pip install -q --no-index --no-deps --target "$wheel_site" wheels/*.whl || return
    else
        echo "no wheels/ folder: vector-quantize-pytorch will be reported missing"
    fi
    "$py" -c "import vqfast; print('vqfast', vqfast.__version__)"
}

tests() {
    local selection=(tests)
    if [[ $dry_run -eq 1 ]]; then  # the pipeline, not the suite (CI runs the suite itself)
        selection=(tests/test_modules.py -k "matches_oracle")
    fi
    "$py" -m pytest -q -p no:cacheprovider --junitxml "$out/tests.xml" "${selection[@]}" \
        2>&1 | tee "$out/tests.log"
}

bench() {
    local size=() lfq_size=() rvq_size=()
    if [[ $dry_run -eq 1 ]]; then
        size=(--tiny --device cpu)
        lfq_size=(--dims 6 --n 256 --device cpu)
        rvq_size=(--quick --device cpu)
    fi
    "$py" -m benchmarks "${size[@]}" --out "$out" --name bench || return
    "$py" -m benchmarks.lookup_free "${lfq_size[@]}" --out "$out" --merge-into bench || return
    "$py" -m benchmarks.residual "${rvq_size[@]}" --out "$out" --merge-into bench
}

train() {
    local mode=()
    [[ $dry_run -eq 1 ]] && mode=(--dry-run)
    "$py" -m benchmarks.train "${mode[@]}" --out "$out/train.json"
}

wheel_site=/tmp/vqfast-wheels
if [[ $dry_run -eq 0 ]] && compgen -G "wheels/*.whl" > /dev/null; then
    export PYTHONPATH="$wheel_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export dry_run out py wheel_site
export -f install tests bench train

run_part install 120 install
run_part env 60 "$py" -m benchmarks.gpu.report env "$out"
run_part tests 210 tests
run_part bench 150 bench
run_part train 300 train
"$py" -m benchmarks.gpu.report summary "$out" "${summary_args[@]}" || failed=1
echo "=== wrote $(ls "$out" | tr '\n' ' ')"
cat "$out/SUMMARY.md" 2>/dev/null | head -40
exit $failed
