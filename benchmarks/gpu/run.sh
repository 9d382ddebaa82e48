#!/usr/bin/env bash
# The one command for a GPU machine: evidence within a time budget (7 minutes by default).
#
#   bash benchmarks/gpu/run.sh OUT_DIR                   # on the GPU machine
#   bash benchmarks/gpu/run.sh --budget 300 OUT_DIR      # a tighter budget, in seconds
#   bash benchmarks/gpu/run.sh --dry-run OUT_DIR         # the same parts on CPU, tiny, for CI
#
# Installs vqfast without touching the machine's torch (pip --no-deps), and the wheels in
# ./wheels (benchmarks/gpu/fetch_wheels.sh, carried along) with --no-index; without them
# the vector-quantize-pytorch columns say it is missing. Then runs its parts in order of
# value, each time-boxed and cut to what is left of the budget (a part that would get
# under 15 s is skipped), and rewrites SUMMARY.md after every part, so a run stopped at
# any point still reports what finished:
#   1 install, env        env.json: GPU, SMs, driver, CUDA, torch, triton, numpy, commit;
#                         cache.log: the Triton cache carried in .triton-cache installed
#                         (python -m benchmarks.gpu.cache build: kernels and launchers
#                         built on a CPU machine for this GPU's triton, Python and arch)
#   precompile            precompile.log: the benchmarks' kernels compiled on every core at
#                         once into triton's cache (none where the carried cache has them);
#                         then each recorded kernel looked up, and on a GPU each step run
#                         once with triton's front end disabled (a launch the cache misses
#                         fails, named)
#   2 correctness         tests.xml, tests.log: every kernel against the oracle at several
#                         shapes and dtypes, past 2**31 elements, a step under the CUDA sync
#                         debugger, a VQ-VAE step in a CUDA graph (no JIT of every variant),
#                         each fast kernel launch checked against triton's own choice
#   3 bench               bench.json/.md/.png: seed and large shapes, vqfast vs the
#                         reference vs vector-quantize-pytorch, bf16 and fp32; then the
#                         statistics atomics relaxed vs acq_rel (the EMA step, one run)
#   4 train               train.json: VQ-VAE step eager / torch.compile / CUDA graph, the
#                         quantizer's share, kernel launches, a sync-debug step
#   5 family              bench.*: residual/grouped/cosine, encode, SimVQ, IBQ, LFQ/FSQ, residual FSQ/LFQ, VAR,
#                         models with and without vqfast.patch
#   6 quality             train.json: the quality benchmark's curves with the time left
#   cache                 (dry run only, where .triton-cache was built here) cache.log: every
#                         launch the parts make, recorded from their own code on CPU
#                         stand-ins, looked up in the carried cache as the GPU's triton would
#   triton-cache-new.tar.gz  after the parts: what triton compiled on the machine, for
#                         `python -m benchmarks.gpu.cache merge` into the carried cache
#   SUMMARY.md            parts, times, tests, headline ratios beside PREDICTION.md, and
#                         per part the kernel builds triton compiled on the machine or found
#                         in its cache (compiles.jsonl)
# A failing part is recorded and the others still run; the exit code is 0 only if every
# part that ran passed. Uses $PYTHON if set, else python3.
set -uo pipefail

dry_run=0
budget=420
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --budget) budget="${2:-}"; shift 2 || break ;;
        --budget=*) budget="${1#*=}"; shift ;;
        -*) echo "unknown option $1" >&2; set -- ; break ;;
        *) break ;;
    esac
done
if [[ $# -ne 1 || ! "$budget" =~ ^[0-9]+$ ]]; then
    echo "usage: bash benchmarks/gpu/run.sh [--dry-run] [--budget SECONDS] OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
out="$(cd "$1" && pwd)"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo" || exit 2
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
deadline=$((SECONDS + budget))

summary_args=()
failed=0
summarize() {
    "$py" -m benchmarks.gpu.report summary "$out" --budget "$budget" "${summary_args[@]}" \
        > /dev/null 2>&1 || echo "(could not write SUMMARY.md)"
}
# run_part NAME SECONDS COMMAND...: run within min(SECONDS, what is left), record the exit
# code and time, rewrite the summary, go on.
run_part() {
    local name="$1" limit="$2"
    shift 2
    local left=$((deadline - SECONDS - 5))
    if [[ $left -lt 15 ]]; then
        echo "=== $name: skipped, ${left}s of the budget left"
        summary_args+=(--part "$name=skipped:0:0")
        summarize
        return
    fi
    [[ $limit -gt $left ]] && limit=$left
    echo "=== $name (limit ${limit}s): $*"
    export part_ends_at=$(( $(date +%s) + limit ))  # (a part may fit its last step to it)
    export VQFAST_PART="$name"  # (compiles.jsonl: triton's builds, by part)
    local start=$SECONDS
    # SIGINT first: pytest still writes its junit file when interrupted.
    timeout -s INT -k 10 "$limit" bash -c '"$@"' "$name" "$@"
    local code=$?
    echo "=== $name: exit $code after $((SECONDS - start))s"
    summary_args+=(--part "$name=$code:$((SECONDS - start)):$limit")
    [[ $code -eq 0 ]] || failed=1
    summarize
}

install() {
    if [[ $dry_run -eq 1 ]]; then  # CI installed it already; only check the import
        "$py" -c "import vqfast; print('vqfast', vqfast.__version__, 'from', vqfast.__file__)" \
            || return
        if [[ -f .triton-cache/manifest.json ]]; then
            echo "carried Triton cache: checked in the dry run's last part (cache)" \
                | tee "$out/cache.log"
        else
            "$py" -m benchmarks.gpu.cache check --optional 2>&1 | tee "$out/cache.log"
            [[ ${PIPESTATUS[0]} -eq 0 ]] || return 1
        fi
    else
        if [[ -f .triton-cache/manifest.json ]]; then  # carried along: where triton looks
            "$py" -m benchmarks.gpu.cache install "$TRITON_CACHE_DIR" 2>&1 | tee "$out/cache.log"
        fi
        "$py" -m pip install -q --no-deps --no-build-isolation -e . || return
        if compgen -G "wheels/*.whl" > /dev/null; then
            # Beside the image's packages, not over them: a folder first on PYTHONPATH.
            rm -rf "$wheel_site"
            "$py" -m pip install -q --no-index --no-deps --target "$wheel_site" wheels/*.whl || return
        else
            echo "no wheels/ folder: vector-quantize-pytorch will be reported missing"
        fi
    fi
    "$py" -m benchmarks.gpu.report env "$out"
}

carried_cache() {
    # the dry run's check of the carried cache built here: every launch the parts make,
    # recorded from their own code, looked up as the GPU's triton would (its triton version
    # first on the path: $VQFAST_CACHE_TRITON, e.g. .ci-triton36)
    "$py" -m benchmarks.gpu.cache check \
        ${VQFAST_CACHE_TRITON:+--triton-path "$VQFAST_CACHE_TRITON"} 2>&1 | tee -a "$out/cache.log"
    return "${PIPESTATUS[0]}"
}

precompile() {
    local steps=(--steps all)
    if [[ $dry_run -eq 1 ]]; then  # the VQ-VAE shape's steps, into a cache of its own
        steps=(--steps vqvae)
        TRITON_CACHE_DIR="$(mktemp -d)" || return
        export TRITON_CACHE_DIR
        trap 'rm -rf "$TRITON_CACHE_DIR"' EXIT
    fi
    # A cache half built still spares the later parts' compiles: cut at the part's end,
    # a note, not a failure (the later parts compile what is missing).
    local left=$(( part_ends_at - $(date +%s) - 3 ))
    timeout -s INT -k 3 "$left" "$py" -m benchmarks.gpu.precompile "${steps[@]}" --check 2>&1 \
        | tee "$out/precompile.log"
    local code=${PIPESTATUS[0]}
    if [[ $code -eq 124 ]]; then
        echo "precompile: cut at the part's limit" | tee -a "$out/precompile.log"
        return 0
    fi
    return "$code"
}

correctness() {
    # A focused selection: the kernels against the oracle, the 2**31 cases, the launchers'
    # limits, the sync-debug and CUDA-graph steps (benchmarks.gpu.cache.CORRECTNESS, whose
    # launches the carried Triton cache holds).
    local selection
    mapfile -t selection < <("$py" -m benchmarks.gpu.cache selection)
    (( ${#selection[@]} )) || { echo "no test selection (benchmarks.gpu.cache selection)"; return 1; }
    if [[ $dry_run -eq 1 ]]; then  # the pipeline, not the suite (CI runs the suite itself)
        selection=(tests/test_modules.py -k "matches_oracle")
    fi
    # (every fast launch checked against triton's own choice of compiled kernel)
    VQFAST_CHECK_LAUNCH_KEYS=1 "$py" -m pytest -q -p no:cacheprovider --junitxml "$out/tests.xml" \
        "${selection[@]}" 2>&1 | tee "$out/tests.log"
}

bench() {
    local size=(--headline) ab_size=()
    if [[ $dry_run -eq 1 ]]; then
        size=(--tiny --device cpu)
        ab_size=(--tiny --device cpu)
    fi
    "$py" -m benchmarks "${size[@]}" --out "$out" --name bench || return
    # The A/B runs the Triton path: on CPU only under the interpreter.
    TRITON_INTERPRET=$dry_run "$py" -m benchmarks.atomics "${ab_size[@]}" --out "$out" --merge-into bench
}

train() {
    local mode=()
    [[ $dry_run -eq 1 ]] && mode=(--dry-run)
    "$py" -m benchmarks.train "${mode[@]}" --out "$out/train.json" \
        --parts eager compiled cuda_graph quantizer_share launches no_host_sync
}

family() {
    local lfq_size=() rvq_size=()
    if [[ $dry_run -eq 1 ]]; then
        lfq_size=(--dims 6 --bsq-dims 6 --n 256 --device cpu)
        rvq_size=(--quick --device cpu)
    fi
    "$py" -m benchmarks.residual "${rvq_size[@]}" --out "$out" --merge-into bench || return
    "$py" -m benchmarks.encode "${rvq_size[@]}" --out "$out" --merge-into bench || return
    "$py" -m benchmarks.sim_vq "${rvq_size[@]}" --out "$out" --merge-into bench || return
    "$py" -m benchmarks.ibq "${rvq_size[@]}" --out "$out" --merge-into bench || return
    "$py" -m benchmarks.residual_lookup_free "${rvq_size[@]}" --out "$out" --merge-into bench \
        || return
    "$py" -m benchmarks.multiscale "${rvq_size[@]}" --out "$out" --merge-into bench || return
    "$py" -m benchmarks.lookup_free "${lfq_size[@]}" --out "$out" --merge-into bench || return
    # models others wrote, with and without vqfast.patch (cases whose library is absent skip)
    "$py" -m benchmarks.patched "${rvq_size[@]}" --out "$out" --merge-into bench || return
    # codecs' quantizers against ResidualVQ with their conventions, in what the part has
    # left (last: the family's other results are in by then, whatever happens here)
    local left=$(( part_ends_at - $(date +%s) - 5 ))
    if [[ $left -lt 20 ]]; then
        echo "benchmarks.codecs: skipped, ${left}s left in the part"
        return 0
    fi
    timeout -s INT -k 5 "$left" "$py" -m benchmarks.codecs "${rvq_size[@]}" --out "$out" \
        --merge-into bench
    local code=$?
    if [[ $code -eq 124 ]]; then  # out of the part's time: a note, not a failure
        echo "benchmarks.codecs: cut at the part's limit"
        return 0
    fi
    return $code
}

quality() {
    # trains for what is left of the part, less a margin for its start and teardown
    local mode=() seconds=$(( part_ends_at - $(date +%s) - 12 ))
    [[ $dry_run -eq 1 ]] && mode=(--dry-run)
    [[ $seconds -lt 5 ]] && seconds=5
    "$py" -m benchmarks.train "${mode[@]}" --out "$out/train.json" --parts quality \
        --quality-seconds "$seconds"
}

wheel_site=/tmp/vqfast-wheels
if [[ $dry_run -eq 0 ]] && compgen -G "wheels/*.whl" > /dev/null; then
    export PYTHONPATH="$wheel_site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ $dry_run -eq 0 ]]; then  # triton's cache for the run (install puts the carried one there)
    export TRITON_CACHE_DIR=/tmp/vqfast-triton-cache
fi
export VQFAST_COMPILE_LOG="$out/compiles.jsonl"
rm -f "$VQFAST_COMPILE_LOG" "$out/cache.log"  # (the logs parts append to)
export dry_run out py wheel_site deadline
export -f install carried_cache precompile correctness bench train family quality

# Limits in order of value; they add up to the default 420 s budget (quality trains for
# what is left less a 40 s margin for its start and teardown).
run_part install 30 install
run_part precompile 20 precompile
run_part correctness 120 correctness
run_part bench 90 bench
run_part train 50 train
run_part family 90 family
run_part quality 20 quality
if [[ $dry_run -eq 1 && -f .triton-cache/manifest.json ]]; then
    deadline=$((SECONDS + 160))  # (its own time, beyond the budget the GPU's parts share)
    run_part cache 150 carried_cache
fi
if [[ $dry_run -eq 0 ]]; then  # what triton compiled here, for the next run to carry
    "$py" -m benchmarks.gpu.cache harvest "$TRITON_CACHE_DIR" "$out/triton-cache-new.tar.gz" \
        2>&1 | tee -a "$out/cache.log"
fi
echo "=== wrote $(ls "$out" | tr '\n' ' ')"
cat "$out/SUMMARY.md" 2>/dev/null | head -60
exit $failed
