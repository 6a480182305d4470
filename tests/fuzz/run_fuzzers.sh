#!/usr/bin/env bash
# Runs libFuzzer harnesses of a fuzz build (QCAL_FUZZ=ON), each from its committed seed corpus
# (tests/fuzz/corpus/<name>, read only) plus the corpus it grew in earlier runs
# (BUILD/fuzz/corpus/<name>). Two modes:
#   - FUZZ_SECONDS=N (default 60): N seconds each, random seed: the search for new bugs;
#   - FUZZ_RUNS=N: N inputs each from seed FUZZ_SEED (default 1), no time bound: reproducible, the
#     same inputs on every machine, so CI passes or fails on the code, not on luck or CPU speed. Prints one line per harness with its executions
# and a total; exits non-zero when any harness finds a crash, a leak, a timeout (10 s for one
# input) or an out-of-memory (2 GiB), naming the input that shows it (BUILD/fuzz/artifacts/).
# FUZZ_JOBS harnesses run at once (default: the number of cores); each is one process with its own
# corpus directory, so what each runs does not depend on the others, and the lines are printed in
# the order of the names.
#
#   tests/fuzz/run_fuzzers.sh BUILD NAME...     (from the repository root)
set -uo pipefail
build=$1
shift
seconds=${FUZZ_SECONDS:-60}
runs_wanted=${FUZZ_RUNS:-}
if [ -n "$runs_wanted" ]; then
  bound=(-runs="$runs_wanted" -seed="${FUZZ_SEED:-1}")
  unit="from seed ${FUZZ_SEED:-1}"
else
  bound=(-max_total_time="$seconds")
  unit="in ${seconds} s"
fi
mkdir -p "$build/fuzz/tmp" "$build/fuzz/artifacts" "$build/fuzz/logs"
export TMPDIR="$build/fuzz/tmp"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
jobs=${FUZZ_JOBS:-$(nproc)}
# Runs harness $1; its exit status goes to BUILD/fuzz/logs/$1.rc.
run_one() {
  local name=$1 dict
  mkdir -p "$build/fuzz/corpus/$name"
  # Dictionaries (tests/fuzz/dict): boundary numbers and the format's keys.
  case $name in
    recipe | model_config) dict=(-dict="tests/fuzz/dict/$name.dict") ;;
    safetensors | gptq_checkpoint | adapter | activations | layer_artifact)
      dict=(-dict=tests/fuzz/dict/checkpoint.dict) ;;
    *) dict=() ;;
  esac
  "$build/fuzz/fuzz_$name" "${bound[@]}" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$build/fuzz/artifacts/$name-" "${dict[@]}" \
    "$build/fuzz/corpus/$name" "tests/fuzz/corpus/$name" >"$build/fuzz/logs/$name.log" 2>&1
  echo $? >"$build/fuzz/logs/$name.rc"
}
running=0
for name in "$@"; do
  if ((running >= jobs)); then
    wait -n
    running=$((running - 1))
  fi
  run_one "$name" &
  running=$((running + 1))
done
wait
total=0
failed=()
for name in "$@"; do
  log="$build/fuzz/logs/$name.log"
  rc=$(cat "$build/fuzz/logs/$name.rc" 2>/dev/null || echo 1)
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  runs=${runs:-0}
  total=$((total + runs))
  if [ "$rc" -ne 0 ]; then
    failed+=("$name")
    echo "fuzz: $name FAILED after $runs executions (exit $rc); log $log:"
    grep -E "ERROR|SUMMARY|Test unit written|runtime error|CHECK failed" "$log" | head -20
  else
    echo "fuzz: $name $runs executions $unit"
  fi
done
echo "fuzz: $total executions in all, ${#failed[@]} harnesses failed${failed:+: ${failed[*]}}"
[ ${#failed[@]} -eq 0 ]
