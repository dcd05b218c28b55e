#!/usr/bin/env bash
# Everything a session with a lent GPU should check and measure, in one device call (about 9 minutes at most).
#
#     bash benchmarks/gpu_session.sh                  # every step, in this order
#     bash benchmarks/gpu_session.sh run bench_hf     # only these steps (the build is still run first)
#
# Steps: build (the CUDA extension for sm_90: TORCH_CUDA_ARCH_LIST=9.0), tests (the CUDA and Triton tests on
# the GPU), memcheck and racecheck (compute-sanitizer on a few of them), run (the standard benchmark set,
# rewriting RESULTS.md's cuda block), eigensolvers (benchmarks/study_eigensolvers.py), bench_hf (LLaVA-1.5-7B
# shapes, random weights), attention (last_query_attention in bf16 with grouped-query heads and N = 32892),
# scale (the information score's two paths at Nv = 576, 2880, 16384, D = 4096).
#
# The whole session shares one deadline (GPU_SESSION_SECONDS, 570 by default: a device call may run 600 s).
# Each step runs under `timeout` with its own cap, cut to the time left; a step that no longer fits is skipped.
# A failing step is recorded and the next one runs; the script exits 1 at the end if any step failed (2 if the
# build failed: nothing else can run). Output: $OUT (or benchmarks/out/gpu_session) gets session.log (every
# step's output), summary.txt (one line per step: status, seconds), RESULTS.md, results.csv and bench_hf.csv.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG_DIR=${OUT:-benchmarks/out/gpu_session}
DEADLINE=$((SECONDS + ${GPU_SESSION_SECONDS:-570}))
mkdir -p "$LOG_DIR" benchmarks/out
LOG=$LOG_DIR/session.log
SUMMARY=$LOG_DIR/summary.txt
: >"$LOG"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
FAILED=0
WANTED=" ${*:-tests memcheck racecheck run eigensolvers bench_hf attention scale} "

# step NAME CAP_SECONDS COMMAND...: run COMMAND under timeout (CAP, or the time left if less), log it, record it.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    local limit=$((cap < left ? cap : left))
    if ((limit < 20)); then
        echo "$name: skipped, ${left} s left of the session's deadline" | tee -a "$SUMMARY"
        return 0
    fi
    echo "=== $name (at most ${limit} s): $*" | tee -a "$LOG"
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" || rc=$?
    local status="ok"
    if ((rc == 124 || rc == 137)); then
        status="TIMED OUT"
    elif ((rc != 0)); then
        status="FAILED (exit $rc)"
    fi
    echo "$name: $status, $((SECONDS - start)) s" | tee -a "$SUMMARY"
    [[ $status == ok ]] || FAILED=1
}

wanted() { [[ $WANTED == *" $1 "* ]]; }

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' \
        || true
} 2>&1 | tee -a "$LOG"

step build 300 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
    "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e .
if [[ $(tail -n 1 "$SUMMARY") != "build: ok"* ]]; then
    echo "the build failed: nothing else can run" | tee -a "$SUMMARY"
    exit 2
fi

# The CUDA tests and the Triton tests (which run on the GPU when there is one); the nvcc compile checks are
# for machines without a GPU (the build above compiled the same files).
wanted tests && step tests 180 "$PY" -m pytest -q -p no:cacheprovider tests -k "(cuda or triton) and not compiles"

# compute-sanitizer on a few tests of each kernel family. Without the caching allocator every tensor is its own
# allocation, so an out-of-bounds access cannot land silently inside a pooled block.
SANITIZED=(tests/test_select.py tests/test_merge.py tests/test_last_query_attention.py tests/test_info_scores.py)
SANITIZED_K="(cuda_equals_cpu and float32 and not similarity) or triton_matches_reference or triton_exact_matches"
wanted memcheck && step memcheck 100 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
    "$PY" -m pytest -q -p no:cacheprovider "${SANITIZED[@]}" -k "$SANITIZED_K"
wanted racecheck && step racecheck 80 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool racecheck --error-exitcode 1 --target-processes all \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_select.py tests/test_merge.py tests/test_last_query_attention.py \
    -k "(cuda_equals_cpu and float32 and not similarity) or triton_matches_reference"

wanted run && step run 200 "$PY" -m benchmarks.run --device cuda --max-seconds 3 --results benchmarks/RESULTS.md
wanted eigensolvers && step eigensolvers 90 "$PY" -m benchmarks.study_eigensolvers --device cuda --max-seconds 3
wanted bench_hf && step bench_hf 150 "$PY" -m benchmarks.bench_hf --device cuda --max-seconds 10
wanted attention && step attention 60 "$PY" -m benchmarks.bench_last_query_attention --device cuda --dtype bf16 \
    --shapes llava15 llava15_gqa video_long --max-seconds 2
wanted scale && step scale 60 "$PY" -m benchmarks.scale_info_scores --device cuda --dim 4096 \
    --nvs 576,2880,16384 --ranks 64,128,256

for f in benchmarks/RESULTS.md benchmarks/out/results.csv benchmarks/out/bench_hf.csv; do
    if [[ -f $f ]]; then cp "$f" "$LOG_DIR/"; fi
done
cat "$SUMMARY"
exit "$FAILED"
