#!/usr/bin/env bash
# One GPU session, run on the device machine from the repository root: unpacks the bundle made by
# tools/gpu/pack.sh, runs the GPU tests (plus compute-sanitizer memcheck of the op tests and
# racecheck of the attention kernel), evaluates both shared models on CUDA with the CLI when it
# has --device, writes every log under $OUT and prints a summary table last.
#
#   device call: carry [".devpack"], command "bash tools/gpu/session.sh"
#   usage: tools/gpu/session.sh [PACK]   (default: .devpack/pack.tar.gz; logs to $OUT or ./out)
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
pack=${1:-$root/.devpack/pack.tar.gz}
out=${OUT:-$root/out}
mkdir -p "$out"
p=$(mktemp -d /tmp/qcal-pack.XXXXXX)
tar xzf "$pack" -C "$p" || { echo "session.sh: cannot unpack $pack" >&2; exit 1; }
export QCAL_SHARED_DIR=$p/data/shared QCAL_SOURCE_DIR=$root
export LD_LIBRARY_PATH="$p/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
summary=$out/summary.txt
: >"$summary"
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$out/gpu.txt" 2>&1
echo "gpu: $(head -1 "$out/gpu.txt")" >>"$summary"
printf '%-34s %4s %6s %6s %7s %7s\n' step rc passed failed skipped seconds >>"$summary"

# step NAME LOG TIMEOUT COMMAND...: runs one gtest binary (or wrapper), records its counts.
step() {
  local name=$1 log=$2 limit=$3
  shift 3
  local start=$SECONDS
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  local passed failed skipped
  passed=$(grep -cE '^\[       OK \] .* \([0-9]+ ms\)$' "$log")
  failed=$(grep -cE '^\[  FAILED  \] .* \([0-9]+ ms\)$' "$log")
  skipped=$(grep -cE '^\[  SKIPPED \] .* \([0-9]+ ms\)$' "$log")
  printf '%-34s %4d %6d %6d %7d %7d\n' "$name" "$rc" "$passed" "$failed" "$skipped" \
    $((SECONDS - start)) >>"$summary"
  ((rc == 0)) || status=1
}

step cuda_ops_test "$out/cuda_ops_test.log" 100 "$p/bin/cuda_ops_test" --gtest_color=no
step cuda_model_test "$out/cuda_model_test.log" 120 "$p/bin/cuda_model_test" --gtest_color=no
# The 7B shapes are too slow under the sanitizer; the error test provokes a failed cudaMalloc,
# which memcheck would report.
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [[ -n $sanitizer ]]; then
  step "memcheck cuda_ops_test" "$out/memcheck.log" 90 "$sanitizer" --tool memcheck \
    --error-exitcode 1 "$p/bin/cuda_ops_test" --gtest_color=no \
    --gtest_filter='-*SevenB*:*ErrorsAreStatuses*'
  step "racecheck attention" "$out/racecheck.log" 60 "$sanitizer" --tool racecheck \
    --error-exitcode 1 "$p/bin/cuda_ops_test" --gtest_color=no --gtest_filter='*Attention*'
else
  echo "compute-sanitizer not found: sanitizer steps skipped" >>"$summary"
fi

# The CLI on CUDA, once it has --device (the reference perplexities are 6.8908 and 28.728).
eval_log=$out/eval.log
if "$p/bin/qcal" eval --help 2>&1 | grep -q -- '--device'; then
  evaluate() {
    local label=$1
    shift
    local line
    line=$(timeout 60 "$p/bin/qcal" eval --device cuda --json "$@" 2>>"$eval_log")
    local rc=$?
    echo "$label rc=$rc $line" >>"$eval_log"
    printf '%-34s %4d %s\n' "$label" "$rc" "$line" >>"$summary"
    ((rc == 0)) || status=1
  }
  evaluate "qcal eval stories260k L=256" --model "$QCAL_SHARED_DIR/models/stories260k" \
    --text "$QCAL_SHARED_DIR/data/tinystories-eval.txt" --seq-len 256
  evaluate "qcal eval sotu-llama-16m L=512" --model "$QCAL_SHARED_DIR/models/sotu-llama-16m" \
    --text "$QCAL_SHARED_DIR/data/sotu-eval.txt" --seq-len 512 --max-windows 32
else
  echo "qcal eval --device cuda: skipped (the CLI has no --device flag yet)" | tee -a "$summary" >"$eval_log"
fi

{
  echo "--- numbers"
  grep -hE '^(device kind|f32 |bf16 )' "$out/cuda_ops_test.log"
  grep -hE 'perplexity [0-9.]+, [0-9]+ tokens' "$out/cuda_model_test.log"
  grep -hE '^\[  FAILED  \] .* \([0-9]+ ms\)$' "$out"/*.log
  grep -hE 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/memcheck.log" "$out/racecheck.log" 2>/dev/null
} >>"$summary"
rm -rf "$p"
echo "=== qcal GPU session summary"
cat "$summary"
exit $status
