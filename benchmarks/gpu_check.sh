#!/usr/bin/env bash
# GPU acceptance check: one command from a verdict on a machine with one NVIDIA GPU.
#
#   bash benchmarks/gpu_check.sh OUT_DIR          on a GPU, about 5 minutes
#   bash benchmarks/gpu_check.sh --sim OUT_DIR    the same logic in Numba's CUDA simulator on tiny
#                                                 shapes, hardware-only parts skipped (CI runs it)
#
# Steps (each bounded by a timeout; its exit status and time go to OUT_DIR/status.txt):
#   doctor     cnnfast doctor: versions, driver, GPU
#   suite      (a) the tests that reach the cuda path, on the GPU (gpu-marked ones too),
#                  beside ops/memcheck/racecheck
#   ops        (b) every op at real shapes (SmallCNN, ResNet-18 2D and 3D) vs the CPU reference
#   memcheck   (c) compute-sanitizer memcheck over one SmallCNN training step (when installed)
#   racecheck  (c) compute-sanitizer racecheck over the same step
#   bench      (d) training steps and conv forward / backward-data / backward-weight per layer
#                  vs PyTorch + cuDNN (TF32 off and on), host microseconds per launch
#   tc         (e) the TF32 / BF16 tensor-core convolutions: every element within the bound
#                  derived from the rounding, and their speed vs the FP32 kernels and cuDNN
#                  TF32 / BF16 (benchmarks/gpu_tc_check.py, OUT_DIR/tc_check.json)
# then a summary (OUT_DIR/summary.json) and the exit status: 0 when every step passed.
# To fit a short GPU lease: GPU_CHECK_{SUITE,OPS,SANITIZER,BENCH,TC}_SECONDS set the step limits,
# GPU_CHECK_SANITIZERS the tools to run ("memcheck racecheck"), GPU_CHECK_BENCH_ARGS=--full adds
# the larger layer sets to the bench.
# Runs from the working tree (no install): PYTHONPATH points at the repository.
set -uo pipefail

sim=0
if [ "${1:-}" = "--sim" ]; then
    sim=1
    shift
fi
if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh [--sim] OUT_DIR" >&2
    exit 2
fi
out="$1"
mkdir -p "$out" || exit 2
out="$(cd "$out" && pwd)"
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo" || exit 2
py="${PYTHON:-python3}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
log="$out/gpu_check.log"
: >"$log"
: >"$out/status.txt"
flags=()
if [ "$sim" -eq 1 ]; then
    flags=(--sim)
    export NUMBA_ENABLE_CUDASIM=1
fi

# run NAME LIMIT_SECONDS COMMAND...: log the output, record "NAME STATUS SECONDS"
run() {
    local name="$1" limit="$2"
    shift 2
    echo "=== $name: $*" | tee -a "$log"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "$name $rc $((SECONDS - start))" >>"$out/status.txt"
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
}

# run_apart NAME LIMIT COMMAND...: like run, for a step beside others: its output goes to
# OUT_DIR/NAME.log, and the log gets its last lines when it ends
run_apart() {
    local name="$1" limit="$2"
    shift 2
    echo "=== $name (beside the next steps, output in $name.log): $*" | tee -a "$log"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name $rc $((SECONDS - start))" >>"$out/status.txt"
    { tail -n 15 "$out/$name.log"; echo "=== $name: exit $rc after $((SECONDS - start)) s"; } \
        | tee -a "$log"
}

skip() {
    echo "=== $1: skipped ($2)" | tee -a "$log"
    echo "$1 77 0" >>"$out/status.txt"
}

run doctor 60 "$py" -m cnnfast doctor

# (a) and (b)+(c) side by side: neither is timed, the GPU has room for both, and the device time
# of a lent GPU is short. The bench runs alone afterwards.
if [ "$sim" -eq 1 ]; then
    # The whole suite is what CI runs anyway; here one fused-kernel test proves the step works.
    run_apart suite 300 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py \
        -k "fused_conv_bias_relu" &
else
    xdist=()
    if "$py" -c "import xdist" 2>/dev/null; then
        xdist=(-n 6)  # CPU-side work spread over the cores; the GPU is shared by the workers
    fi
    # The tests that reach the cuda path (CI runs the rest, on CPUs); simulator-only tests
    # (they start processes under NUMBA_ENABLE_CUDASIM) are left to CI.
    run_apart suite "${GPU_CHECK_SUITE_SECONDS:-200}" "$py" -m pytest -q -p no:cacheprovider \
        "${xdist[@]}" -k "(cuda or gpu) and not simulator and not without_gpu and not unavailable" \
        tests &
fi
suite_pid=$!

(
    run ops "${GPU_CHECK_OPS_SECONDS:-150}" "$py" benchmarks/gpu_check.py ops "$out" "${flags[@]}"
    if [ "$sim" -eq 1 ]; then
        run step 120 "$py" benchmarks/gpu_check.py step "$out" --sim
        skip memcheck "the simulator has no device code to check"
        skip racecheck "the simulator has no device code to check"
    elif command -v compute-sanitizer >/dev/null 2>&1; then
        for tool in memcheck racecheck; do
            case " ${GPU_CHECK_SANITIZERS:-memcheck racecheck} " in
                *" $tool "*) ;;
                *) skip "$tool" "not asked for (GPU_CHECK_SANITIZERS)"; continue ;;
            esac
            run "$tool" "${GPU_CHECK_SANITIZER_SECONDS:-100}" compute-sanitizer --tool "$tool" --error-exitcode 3 \
                "$py" benchmarks/gpu_check.py step "$out"
        done
    else
        skip memcheck "compute-sanitizer not installed"
        skip racecheck "compute-sanitizer not installed"
    fi
)
wait "$suite_pid"

run bench "${GPU_CHECK_BENCH_SECONDS:-150}" "$py" benchmarks/gpu_check.py bench "$out" \
    "${flags[@]}" ${GPU_CHECK_BENCH_ARGS:-}

tc_limit=150
[ "$sim" -eq 1 ] && tc_limit=400  # the simulator: a Python thread per CUDA thread
run tc "${GPU_CHECK_TC_SECONDS:-$tc_limit}" "$py" benchmarks/gpu_tc_check.py "$out" "${flags[@]}"

"$py" benchmarks/gpu_check.py summary "$out" "${flags[@]}" 2>&1 | tee -a "$log"
exit "${PIPESTATUS[0]}"
