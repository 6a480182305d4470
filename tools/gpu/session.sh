#!/usr/bin/env bash
# One GPU session in one device call, run on the device machine from the repository root: unpacks
# the bundle made by tools/gpu/pack.sh, then
#   1. the GPU parity tests (label gpu: ops, solver ops, error reconstruction, models, the
#      quantization driver) and the gang pipeline test (W = 1..4 ranks on CUDA, same bytes);
#   2. qcal eval --device cuda on both shared models (reference perplexities 6.8908 and 28.728,
#      within 0.1%) and greedy generation against stories260k's greedy_256.txt;
#   2b. (step families) tools/families/compare_transformers.py: synthetic checkpoints of every
#      family (dense and MoE) against transformers in fp32: logits, expert choices, greedy tokens;
#   3. qcal quantize --device cuda on sotu-llama-16m, GPTQ W4 g128 and ASER W4A8 per-channel
#      (rank 64), each twice (output files byte-identical, qcal_run.json aside) and once on the CPU
#      with the same seed (perplexities within 0.5%);
#   3b. (step oac) OAC: quantize sotu-llama-16m W2 g64 with hessian output_adaptive as in 3; the
#      7B shape with the sample-wise and per-token output-adaptive Hessians at W2 g64 (qcal bench
#      --recipe: the gradient pass inside the job, then GPTQ alone on the same weights);
#   3c. (step retrain) retraining: the trainer's CUDA ops and the trainer against the CPU; ApiQ on
#      sotu-llama-16m as in 3 (bound 1%); the 7B shape with ApiQ W2 g64 on a few blocks, projected;
#   3d. (step moe) MoE quantization: each MoE family's synthetic checkpoint quantized twice on the
#      GPU (byte-identical) and once on the CPU (perplexity within 0.5%);
#   4. qcal bench: the 7B shape whole-model (three runs), the 70B shape per block (extrapolated);
#   5. qcal bench --er: error reconstruction on the 7B shape's linears (whitening, full and
#      randomized SVD at rank 64), with the randomized path's projected share of the 7B job; then
#      the whole 7B shape with GPTQ alone, with rank-64 ER and with ASER W4A8 (qcal bench --recipe);
#   5b. (step abq) ABQ inference: cuda_model_test's AbqInference* tests (sotu-llama-16m GPTQ W4A8
#      and W2*A8 through the b1 and int8 kernels against dequantization: the same NLL and logits
#      bit for bit; the decode bench on a small shape), and the same comparison as a table by
#      tools/quality/abq_parity.sh (DEVICE=cuda; docs/QUALITY.md); qcal bench --abq: the ABQ GEMMs
#      (b1, int8 IMMA, weight-only A16) against cuBLAS bf16 and int8 at 4096x4096, 11008x4096,
#      4096x11008 and 8192x28672, m = 1, 4, 8, 16, 64; qcal bench --decode: greedy decoding of the
#      7B shape, bf16 against W4A16, W4A8 and W2*A8;
#   6. compute-sanitizer memcheck of the op, solver and ABQ tests and racecheck of the attention
#      kernels, while time is left;
#   7. (steps stream13, stream70; not in the default set) the streaming engine at real sizes on
#      the local disk: `qcal synth --preset 13b` (26 GB of bf16 shards), then `qcal quantize
#      --device cuda --compute-dtype bf16` GPTQ W4 g128, 128 x 2048 calibration, 16 evaluation
#      windows of 512 tokens (the synthetic eval.txt holds about 20), and `qcal bench --shape 13b` with the same recipe (the ratio of the job's
#      quantize stages to the bench); the files are deleted after. stream70: the same with
#      `--preset 70b --layers 12` against `qcal bench --shape 70b`'s time per block;
#   8. (step moebench; not in the default set) `qcal bench --shape mixtral-8x7b` and
#      `--shape qwen3-30b-a3b` (3 blocks each, extrapolated; fallback experts counted);
#   9. (steps ncu, gaps; not in the default set) ncu counters of the attention kernels; a CUPTI
#      timeline of three 7B blocks and where the device idles in it (tools/gpu/cupti_trace,
#      tools/gpu/device_gaps.py), block by block (tools/gpu/block_split.py: the first block's
#      warm-up), and the same bench with CUDA_MODULE_LOADING=EAGER; with QCAL_GAPS_JOBS, the
#      same trace and split for the ER and ASER jobs;
# writes the summary and a tarball of every log under $OUT (a device call brings back at most 8
# files) and prints the summary table last.
#
#   device call: carry [".devpack"], command "bash tools/gpu/session.sh"
#   usage: tools/gpu/session.sh [PACK]   (default: .devpack/pack.tar.xz, else .tar.gz; logs to $OUT
#                                         or ./out)
#   env:   QCAL_SESSION_STEPS  steps to run, any of "tests eval families quantize oac retrain
#                              moe bench er abq sanitizer stream13 stream70 moebench ncu
#                              gaps"
#                              (default: all); QCAL_SESSION_BUDGET seconds for the whole session
#                              before later steps are skipped (default: 500); QCAL_BENCH_RUNS
#                              runs of the 7B bench (default: 3); QCAL_QUANTIZE_CHECKS the
#                              step quantize's checks, any of "w4 aser" (default: both);
#                              QCAL_GAPS_JOBS the step gaps's traced jobs, any of "er aser"
#                              besides GPTQ, each 3 blocks split by block (default: none)
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
pack=${1:-$root/.devpack/pack.tar.xz}
[[ -n ${1:-} || -f $pack ]] || pack=$root/.devpack/pack.tar.gz
dest=${OUT:-$root/out}
steps=" ${QCAL_SESSION_STEPS:-tests eval families quantize oac retrain moe bench er abq sanitizer} "
budget=${QCAL_SESSION_BUDGET:-500}
mkdir -p "$dest"
out=$(mktemp -d /tmp/qcal-logs.XXXXXX)
p=$(mktemp -d /tmp/qcal-pack.XXXXXX)
# pack.sh's bundle is xz (python3's lzma where the machine has no xz), device-pack's gzip.
unpack() {
  case $1 in
    *.xz)
      if command -v xz >/dev/null; then
        xz -dc "$1" | tar xf - -C "$2"
      else
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' \
          "$1" | tar xf - -C "$2"
      fi
      ;;
    *) tar xzf "$1" -C "$2" ;;
  esac
}
unpack "$pack" "$p" || { echo "session.sh: cannot unpack $pack" >&2; exit 1; }
export QCAL_SHARED_DIR=$p/data/shared QCAL_SOURCE_DIR=$root
export LD_LIBRARY_PATH="$p/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
qcal=$p/bin/qcal
models=$QCAL_SHARED_DIR/models
data=$QCAL_SHARED_DIR/data
summary=$out/summary.txt
: >"$summary"
status=0

wants() { [[ $steps == *" $1 "* ]]; }
# Whether at least $1 seconds of the session budget remain.
time_for() { ((SECONDS + $1 <= budget)); }
note() { echo "$*" >>"$summary"; }
fail() {
  note "FAIL: $*"
  status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$out/gpu.txt" 2>&1
note "gpu: $(head -1 "$out/gpu.txt")"
printf '%-34s %4s %6s %6s %7s %7s\n' step rc passed failed skipped seconds >>"$summary"

# gtest NAME LOG TIMEOUT COMMAND...: runs one gtest binary (or wrapper), records its counts.
gtest() {
  local name=$1 log=$2 limit=$3 arg
  shift 3
  for arg in "$@"; do
    if [[ $arg == "$p/bin/"* && ! -x $arg ]]; then
      note "$name: ${arg#"$p/bin/"} is not in the bundle (QCAL_PACK_BINARIES)"
      return 0
    fi
  done
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

# within VALUE REFERENCE TOLERANCE: whether |VALUE/REFERENCE - 1| <= TOLERANCE.
within() { awk -v v="$1" -v r="$2" -v t="$3" 'BEGIN { d = v / r - 1; exit !(d <= t && -d <= t) }'; }
# json_get JSON KEY: a top-level number of a one-line JSON object.
json_get() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

if wants tests; then
  for t in cuda_ops_test cuda_backward_test cuda_quant_test cuda_low_rank_test cuda_abq_test \
      cuda_model_test cuda_engine_test gang_pipeline_test; do
    time_for 60 || { note "$t: skipped (session budget)"; continue; }
    [[ -x $p/bin/$t ]] || { note "$t: not in the bundle (QCAL_PACK_BINARIES)"; continue; }
    filter=()
    # ABQ inference runs in the abq step.
    [[ $t == cuda_model_test ]] && filter=(--gtest_filter='-AbqInference*')
    gtest "$t" "$out/$t.log" 240 "$p/bin/$t" --gtest_color=no "${filter[@]}"
  done
fi

if wants eval; then
  log=$out/eval.log
  evaluate() {  # LABEL REFERENCE ARGS...
    local label=$1 reference=$2
    shift 2
    local line rc ppl
    line=$(timeout 120 "$qcal" eval --device cuda --json "$@" 2>>"$log")
    rc=$?
    echo "$label rc=$rc $line" >>"$log"
    ppl=$( ((rc == 0)) && json_get "$line" perplexity)
    printf '%-34s %4d perplexity %s (reference %s)\n' "$label" "$rc" "${ppl:-?}" "$reference" \
      >>"$summary"
    if ((rc != 0)) || ! within "$ppl" "$reference" 0.001; then
      fail "$label: not within 0.1% of $reference"
    fi
  }
  evaluate "eval stories260k L=256" 6.8908 --model "$models/stories260k" \
    --text "$data/tinystories-eval.txt" --seq-len 256
  evaluate "eval sotu-llama-16m L=512 K=32" 28.728 --model "$models/sotu-llama-16m" \
    --text "$data/sotu-eval.txt" --seq-len 512 --max-windows 32
  timeout 60 "$qcal" generate --device cuda --model "$models/stories260k" --max-new-tokens 256 \
    >"$out/greedy_cuda.txt" 2>>"$log"
  rc=$?
  if ((rc == 0)) && cmp -s "$out/greedy_cuda.txt" "$models/stories260k/greedy_256.txt"; then
    printf '%-34s %4d identical to greedy_256.txt\n' "generate stories260k greedy" "$rc" >>"$summary"
  else
    printf '%-34s %4d DIFFERS from greedy_256.txt\n' "generate stories260k greedy" "$rc" >>"$summary"
    fail "greedy generation on the GPU"
  fi
fi

if wants families; then
  # Every model family against transformers (torch and transformers are on the GPU machine):
  # synthetic checkpoints, logits within 1e-4 on the CPU and the GPU, expert choices (MoE), greedy
  # generation (tools/families/compare_transformers.py).
  if time_for 120; then
    start=$SECONDS
    timeout 300 python3 "$root/tools/families/compare_transformers.py" "$qcal" \
      /tmp/qcal-families --families "${QCAL_FAMILIES:-llama,llama3,qwen2,qwen3,mistral,mixtral,qwen2_moe,qwen3_moe}" \
      >"$out/families.log" 2>&1
    rc=$?
    printf '%-34s %4d %d s\n' "families vs transformers" "$rc" $((SECONDS - start)) >>"$summary"
    ((rc == 0)) || { fail "families vs transformers"; tail -5 "$out/families.log" | sed 's/^/    /' >>"$summary"; }
    [[ -f /tmp/qcal-families/summary.md ]] && sed 's/^/    /' /tmp/qcal-families/summary.md >>"$summary"
    rm -rf /tmp/qcal-families
  else
    note "families: skipped (session budget)"
  fi
fi

# check LABEL RECIPE_YAML [TOLERANCE [SAMPLES]] (steps quantize, oac and retrain): quantize sotu-llama-16m twice on the GPU and once
# on the CPU; logs to $log.
n_recipe=0
check() {
  local label=$1 recipe=$out/recipe-$((++n_recipe)).yaml tolerance=${3:-0.005} samples=${4:-64}
  time_for 120 || { note "$label: skipped (session budget)"; return; }
  printf '%s' "$2" >"$recipe"
  quantize() {  # DEVICE OUT_DIR
    timeout 300 "$qcal" quantize --device "$1" --json --model "$models/sotu-llama-16m" \
      --recipe "$recipe" --calib "$data/sotu-calib.txt" --samples "$samples" --seq-len 512 --seed 0 \
      --eval-text "$data/sotu-eval.txt" --eval-seq-len 512 --eval-max-windows 32 \
      --out "$2" --overwrite 2>>"$log"
  }
  local q gpu1 gpu2 cpu rc start=$SECONDS
  q=$(mktemp -d /tmp/qcal-quant.XXXXXX)
  echo "== $label" >>"$log"
  gpu1=$(quantize cuda "$q/gpu1") && gpu2=$(quantize cuda "$q/gpu2") && cpu=$(quantize cpu "$q/cpu")
  rc=$?
  echo "gpu1 $gpu1" >>"$log"
  echo "gpu2 ${gpu2:-}" >>"$log"
  echo "cpu ${cpu:-}" >>"$log"
  if ((rc == 0)); then
    local identical=yes f
    for f in $(cd "$q/gpu1" && find . -type f ! -name qcal_run.json | sort); do
      cmp -s "$q/gpu1/$f" "$q/gpu2/$f" || { identical="no ($f)"; break; }
    done
    local ppl_gpu ppl_cpu ppl_fp
    ppl_gpu=$(json_get "$gpu1" perplexity)
    ppl_cpu=$(json_get "$cpu" perplexity)
    ppl_fp=$(json_get "$gpu1" perplexity_fp)
    printf '%-34s %4d ppl gpu %s cpu %s (fp %s); two GPU runs identical: %s; %d s\n' \
      "$label" "$rc" "$ppl_gpu" "$ppl_cpu" "$ppl_fp" "$identical" $((SECONDS - start)) \
      >>"$summary"
    [[ $identical == yes ]] || fail "$label: two GPU quantize runs differ: $identical"
    within "$ppl_gpu" "$ppl_cpu" "$tolerance" ||
      fail "$label: GPU perplexity not within $tolerance (relative) of the CPU's"
    cp "$q/gpu1/qcal_report.json" "$out/quantize_gpu_report_$n_recipe.json"
    cp "$q/gpu1/qcal_run.json" "$out/quantize_gpu_run_$n_recipe.json"
    cp "$q/cpu/qcal_run.json" "$out/quantize_cpu_run_$n_recipe.json"
  else
    printf '%-34s %4d\n' "$label" "$rc" >>"$summary"
    fail "$label: qcal quantize"
  fi
  rm -rf "$q"
}
if wants quantize; then
  log=$out/quantize.log
  quantize_checks=" ${QCAL_QUANTIZE_CHECKS:-w4 aser} "
  [[ $quantize_checks == *" w4 "* ]] &&
    check "quantize sotu-llama-16m W4 g128" $'method: gptq\nweights: {bits: 4, group_size: 128}\n'
  # ASER over GPTQ at W4A8 per-channel (rank 64, 32 outlier channels): error reconstruction on
  # the device (randomized SVD) against the CPU's (full SVD).
  [[ $quantize_checks == *" aser "* ]] &&
    check "quantize sotu-llama-16m ASER W4A8" $'method: gptq\nweights: {bits: 4, group_size: -1}\nactivations: {bits: 8}\nsmoothing: {method: aser, outlier_channels: 32}\nerror_reconstruction: {rank: 64}\n'
fi

if wants oac; then
  # OAC (issue 12): sotu-llama-16m W2 g64 with the sample-wise output-adaptive Hessian, twice on the
  # GPU and once on the CPU; then the 7B shape with both OAC forms (the gradient pass inside the
  # job; the bench reruns the same recipe with hessian layer, GPTQ alone, for the ratio).
  # QCAL_OAC_CHECK=0 leaves out the sotu-llama-16m runs; QCAL_OAC_BENCHES names the 7B benches
  # (default: both forms).
  log=$out/oac.log
  if [[ ${QCAL_OAC_CHECK:-1} != 0 ]]; then
    check "quantize sotu-llama-16m OAC W2 g64" $'method: gptq\nhessian: output_adaptive\nweights: {bits: 2, group_size: 64}\n'
  fi
  oac_recipes=(
    "oac-w2g64:method: gptq\nhessian: output_adaptive\nweights: {bits: 2, group_size: 64}\n"
    "oac-token-w2g64:method: gptq\nhessian: output_adaptive_token\nweights: {bits: 2, group_size: 64}\n"
  )
  for entry in "${oac_recipes[@]}"; do
    name=${entry%%:*}
    [[ " ${QCAL_OAC_BENCHES:-oac-w2g64 oac-token-w2g64} " == *" $name "* ]] || continue
    time_for 200 || { note "bench 7b $name: skipped (session budget)"; continue; }
    printf "${entry#*:}" >"$out/bench-$name.yaml"
    start=$SECONDS
    timeout 400 "$qcal" bench --shape 7b --compute-dtype bf16 --recipe "$out/bench-$name.yaml" \
      >"$out/bench_7b_$name.txt" 2>"$out/bench_7b_$name.log"
    rc=$?
    printf '%-34s %4d %d s\n' "bench 7b bf16 $name" "$rc" $((SECONDS - start)) >>"$summary"
    ((rc == 0)) || { fail "bench 7b $name"; tail -5 "$out/bench_7b_$name.log" | sed 's/^/    /' >>"$summary"; }
    grep -hE '^(whole model|gradient pass|the same recipe|  forward|  hessians|  solves|mean rel)' \
      "$out/bench_7b_$name.txt" | sed 's/^/    /' >>"$summary"
  done
fi

if wants retrain; then
  # Retraining (issue 13): the trainer's ops and the whole trainer on the device against the CPU;
  # quantize sotu-llama-16m with ApiQ (W2 g64, 16 samples, 2 output epochs: at 64 samples and
  # the default 20 epochs the CPU trainer takes about 215 s a block with 16 threads) twice on the
  # GPU and once on the CPU (bound 2%: the GPTQ solves agree to 0.01%, but 8 blocks of AdamW
  # steps amplify fp32 sums taken in another order; measured 1.16% on 2026-12-03); then
  # the 7B shape with ApiQ W2 g64 on QCAL_RETRAIN_BLOCKS blocks (default 2, the first left out as
  # warm-up) with QCAL_RETRAIN_EPOCHS output epochs (default 20), projected to the whole model.
  # QCAL_RETRAIN_CHECK=0 leaves out the sotu-llama-16m runs; QCAL_RETRAIN_PROFILE=1 breaks the
  # training steps down (bench --retrain-profile: synchronizations that add to the block times).
  log=$out/retrain.log
  for t in cuda_train_test retrain_cuda_block_trainer_test; do
    time_for 60 || { note "$t: skipped (session budget)"; continue; }
    [[ -x $p/bin/$t ]] || { note "$t: not in the bundle (QCAL_PACK_BINARIES)"; continue; }
    gtest "$t" "$out/$t.log" 240 "$p/bin/$t" --gtest_color=no
  done
  if [[ ${QCAL_RETRAIN_CHECK:-1} != 0 ]]; then
    check "quantize sotu-llama-16m ApiQ W2 g64 16x2ep" $'method: gptq\nweights: {bits: 2, group_size: 64}\nretrain: {method: apiq, epochs: {output: 2}}\n' 0.02 16
  fi
  blocks=${QCAL_RETRAIN_BLOCKS:-2}
  epochs=${QCAL_RETRAIN_EPOCHS:-20}
  if time_for 200; then
    printf 'method: gptq\nweights: {bits: 2, group_size: 64}\nretrain: {method: apiq, epochs: {output: %d}}\n' \
      "$epochs" >"$out/bench-apiq.yaml"
    start=$SECONDS
    limit=$((budget - SECONDS))
    ((limit > 500)) && limit=500
    profile=()
    [[ ${QCAL_RETRAIN_PROFILE:-0} != 0 ]] && profile=(--retrain-profile)
    timeout "$limit" "$qcal" bench --shape 7b --compute-dtype bf16 --blocks "$blocks" "${profile[@]}" \
      --recipe "$out/bench-apiq.yaml" >"$out/bench_7b_apiq.txt" 2>"$out/bench_7b_apiq.log"
    rc=$?
    printf '%-34s %4d %d s\n' "bench 7b bf16 apiq ($blocks blocks, $epochs ep)" "$rc" \
      $((SECONDS - start)) >>"$summary"
    ((rc == 0)) || { fail "bench 7b apiq"; tail -5 "$out/bench_7b_apiq.log" | sed 's/^/    /' >>"$summary"; }
    grep -hE '^(ran |whole model|  forward|  hessians|  solves|  retraining|    training steps|    outside the steps|    of which|mean rel)' \
      "$out/bench_7b_apiq.txt" | sed 's/^/    /' >>"$summary"
    grep -hE 'block [0-9]+/' "$out/bench_7b_apiq.log" | sed 's/^/    /' >>"$summary"
  else
    note "bench 7b apiq: skipped (session budget)"
  fi
fi

if wants moe; then
  # Mixture-of-experts quantization (issue 17) on the GPU: each family's synthetic checkpoint
  # quantized with GPTQ W4 g32 (16 x 128 calibration) twice on the GPU and once on the CPU: the
  # two GPU outputs byte-identical (qcal_run.json aside), the perplexities within 0.5%.
  log=$out/moe.log
  for arch in mixtral qwen2_moe qwen3_moe; do
    time_for 60 || { note "moe $arch: skipped (session budget)"; continue; }
    m=$(mktemp -d /tmp/qcal-moe.XXXXXX)
    start=$SECONDS
    "$qcal" synth --arch "$arch" --out "$m/model" --no-sha256 >>"$log" 2>&1
    printf 'method: gptq\nweights: {bits: 4, group_size: 32}\n' >"$m/recipe.yaml"
    moe_quantize() {  # DEVICE OUT_DIR
      timeout 120 "$qcal" quantize --device "$1" --json --model "$m/model" --recipe "$m/recipe.yaml" \
        --calib "$m/model/calib.txt" --samples 16 --seq-len 128 --eval-text "$m/model/eval.txt" \
        --out "$2" 2>>"$log"
    }
    gpu1=$(moe_quantize cuda "$m/gpu1") && gpu2=$(moe_quantize cuda "$m/gpu2") &&
      cpu=$(moe_quantize cpu "$m/cpu")
    rc=$?
    echo "$arch gpu1 ${gpu1:-} cpu ${cpu:-}" >>"$log"
    if ((rc == 0)); then
      identical=yes
      for f in $(cd "$m/gpu1" && find . -type f ! -name qcal_run.json | sort); do
        cmp -s "$m/gpu1/$f" "$m/gpu2/$f" || { identical="no ($f)"; break; }
      done
      ppl_gpu=$(json_get "$gpu1" perplexity)
      ppl_cpu=$(json_get "$cpu" perplexity)
      printf '%-34s %4d ppl gpu %s cpu %s; two GPU runs identical: %s; %d s\n' "moe quantize $arch" \
        "$rc" "$ppl_gpu" "$ppl_cpu" "$identical" $((SECONDS - start)) >>"$summary"
      [[ $identical == yes ]] || fail "moe $arch: two GPU runs differ: $identical"
      within "$ppl_gpu" "$ppl_cpu" 0.005 || fail "moe $arch: GPU perplexity not within 0.5% of the CPU's"
    else
      printf '%-34s %4d\n' "moe quantize $arch" "$rc" >>"$summary"
      fail "moe $arch: qcal quantize"
    fi
    rm -rf "$m"
  done
fi

if wants bench; then
  # The 7B shape whole-model QCAL_BENCH_RUNS times (default 3: the table reports their median),
  # the 70B shape once.
  for shape in 7b 70b; do
    runs=1
    [[ $shape == 7b ]] && runs=${QCAL_BENCH_RUNS:-3}
    for ((run = 1; run <= runs; ++run)); do
      time_for 90 || { note "bench $shape run $run: skipped (session budget)"; continue; }
      start=$SECONDS
      limit=$((budget - SECONDS))
      ((limit > 300)) && limit=300
      # The reference GPTQ's seconds per layer measured on the H200 (docs/BENCHMARKS.md): 7b only.
      ref=()
      [[ $shape == 7b ]] && ref=(--reference-seconds-per-layer 9.61)
      timeout "$limit" "$qcal" bench --shape "$shape" --compute-dtype bf16 "${ref[@]}" \
        >"$out/bench_${shape}_$run.txt" 2>"$out/bench_${shape}_$run.log"
      rc=$?
      printf '%-34s %4d %d s\n' "bench $shape bf16 run $run" "$rc" $((SECONDS - start)) >>"$summary"
      ((rc == 0)) || fail "bench $shape run $run"
      ((run == 1)) && sed 's/^/    /' "$out/bench_${shape}_$run.txt" >>"$summary"
      ((run > 1)) && grep -h '^whole model' "$out/bench_${shape}_$run.txt" | sed 's/^/    /' \
        >>"$summary"
    done
  done
fi

if wants er; then
  # One run (three timed repetitions of every op, medians); the randomized SVD must stay within 1%
  # of the full SVD's whitened error on every layer.
  if time_for 90; then
    start=$SECONDS
    timeout 240 "$qcal" bench --er --json >"$out/bench_er.json" 2>"$out/bench_er.log"
    rc=$?
    printf '%-34s %4d %d s\n' "bench --er rank 64" "$rc" $((SECONDS - start)) >>"$summary"
    if ((rc != 0)); then
      fail "bench --er"
    elif ! python3 - "$out/bench_er.json" >>"$summary" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
worst = 0
for l in r["layers"]:
    s = l["seconds"]
    worst = max(worst, l["error_ratio"])
    print("    %5d x %-5d whitening %.4f s, full %.3f s, randomized %.4f s, error ratio %.4f"
          % (l["d_out"], l["d_in"], s["whitening"], s["full"], s["randomized"], l["error_ratio"]))
p = r.get("projection_7b")
if p:
    print("    7B projection: %.2f s = %.1f%% of the %.2f s GPTQ job"
          % (p["seconds"], 100 * p["share_of_gptq_job"], p["gptq_job_seconds"]))
sys.exit(worst > 1.01)
PY
    then
      fail "bench --er: the randomized SVD's error is above 1.01x the full SVD's"
    fi
  else
    note "bench --er: skipped (session budget)"
  fi
  # The whole 7B shape with error reconstruction in the job (the randomized SVD on the device),
  # against plain GPTQ in the same session: rank 64 whitening ER, then ASER at W4A8 per-channel.
  er_recipes=(
    "gptq-w4g128:method: gptq\nweights: {bits: 4, group_size: 128}\n"
    "er-r64:method: gptq\nweights: {bits: 4, group_size: 128}\nerror_reconstruction: {rank: 64}\n"
    "er-auto:method: gptq\nweights: {bits: 4, group_size: 128}\nerror_reconstruction: {rank: auto}\n"
    "gptq-w4-perchannel:method: gptq\nweights: {bits: 4, group_size: -1}\n"
    "aser-w4a8-r64:method: gptq\nweights: {bits: 4, group_size: -1}\nactivations: {bits: 8}\nsmoothing: {method: aser, outlier_channels: 32}\nerror_reconstruction: {rank: 64}\n"
  )
  for entry in "${er_recipes[@]}"; do
    name=${entry%%:*}
    time_for 100 || { note "bench 7b $name: skipped (session budget)"; continue; }
    printf "${entry#*:}" >"$out/bench-$name.yaml"
    start=$SECONDS
    timeout 240 "$qcal" bench --shape 7b --compute-dtype bf16 --recipe "$out/bench-$name.yaml" \
      >"$out/bench_7b_$name.txt" 2>"$out/bench_7b_$name.log"
    rc=$?
    printf '%-34s %4d %d s\n' "bench 7b bf16 $name" "$rc" $((SECONDS - start)) >>"$summary"
    ((rc == 0)) || fail "bench 7b $name"
    grep -hE '^(whole model|  smoothing|  forward|  hessians|  solves|    factorizations|mean rel)' \
      "$out/bench_7b_$name.txt" | sed 's/^/    /' >>"$summary"
  done
fi

if wants abq; then
  # ABQ inference against dequantization on sotu-llama-16m (quantized in the test, on the GPU),
  # and the decode bench on a small shape.
  if time_for 150; then
    if [[ -x $p/bin/cuda_model_test ]]; then
      gtest "abq inference (cuda_model_test)" "$out/abq_inference.log" 300 \
        "$p/bin/cuda_model_test" --gtest_color=no --gtest_filter='AbqInference*'
      grep -hE '^(sotu-llama-16m|decode) ' "$out/abq_inference.log" | sed 's/^/    /' >>"$summary"
    else
      note "abq inference: cuda_model_test is not in the bundle (QCAL_PACK_BINARIES)"
    fi
  else
    note "abq inference: skipped (session budget)"
  fi
  if time_for 120; then
    start=$SECONDS
    DEVICE=cuda QCAL=$qcal WORK=$(mktemp -d) timeout 300 "$root/tools/quality/abq_parity.sh" "" \
      "$QCAL_SHARED_DIR" >"$out/abq_parity.md" 2>"$out/abq_parity.log"
    rc=$?
    printf '%-34s %4d %d s\n' "abq parity table" "$rc" $((SECONDS - start)) >>"$summary"
    ((rc == 0)) || fail "abq parity table"
    sed 's/^/    /' "$out/abq_parity.md" >>"$summary"
  else
    note "abq parity table: skipped (session budget)"
  fi
  # One table (about 280 timings of 20 runs each); the summary gets it whole.
  if time_for 120; then
    start=$SECONDS
    timeout 300 "$qcal" bench --abq >"$out/bench_abq.txt" 2>"$out/bench_abq.log"
    rc=$?
    printf '%-34s %4d %d s\n' "bench --abq" "$rc" $((SECONDS - start)) >>"$summary"
    ((rc == 0)) || fail "bench --abq"
    sed 's/^/    /' "$out/bench_abq.txt" >>"$summary"
  else
    note "bench --abq: skipped (session budget)"
  fi
  # Decode size in a chain (back-to-back calls in one CUDA graph), where the targets are read:
  # m = 1, every shape, with the fused one-launch layer's row (b1-fused) beside b1.
  if time_for 60; then
    start=$SECONDS
    timeout 200 "$qcal" bench --abq --abq-timing sequence --abq-tokens 1 \
      >"$out/bench_abq_seq.txt" 2>"$out/bench_abq_seq.log"
    rc=$?
    printf '%-34s %4d %d s\n' "bench --abq sequence m=1" "$rc" $((SECONDS - start)) >>"$summary"
    ((rc == 0)) || fail "bench --abq sequence"
    sed 's/^/    /' "$out/bench_abq_seq.txt" >>"$summary"
  else
    note "bench --abq sequence: skipped (session budget)"
  fi
  # Greedy decoding of the 7B shape (64 timed steps per configuration; the weights of each
  # configuration are drawn and quantized first). It fails when int8's tokens differ from b1's.
  if time_for 150; then
    start=$SECONDS
    timeout 400 "$qcal" bench --decode >"$out/bench_decode.txt" 2>"$out/bench_decode.log"
    rc=$?
    printf '%-34s %4d %d s\n' "bench --decode 7b" "$rc" $((SECONDS - start)) >>"$summary"
    ((rc == 0)) || { fail "bench --decode"; tail -5 "$out/bench_decode.log" | sed 's/^/    /' >>"$summary"; }
    sed 's/^/    /' "$out/bench_decode.txt" >>"$summary"
  else
    note "bench --decode: skipped (session budget)"
  fi
fi

# stream_job LABEL SYNTH_ARGS BENCH_SHAPE: synthesizes a checkpoint on the local disk, quantizes it
# end to end on the GPU, runs the bench on the same shape, keeps qcal_run.json and the logs, and
# deletes the files.
stream_job() {
  local label=$1 synth_args=$2 shape=$3
  local work=/tmp/qcal-stream-$label log=$out/stream_$label.log start rc
  rm -rf "$work"
  mkdir -p "$work/scratch"
  printf 'method: gptq\nweights: {bits: 4, group_size: 128}\n' >"$work/w4g128.yaml"
  df -h /tmp >>"$log" 2>&1
  start=$SECONDS
  # shellcheck disable=SC2086
  "$qcal" synth $synth_args --out "$work/model" --no-sha256 >>"$log" 2>&1
  rc=$?
  printf '%-34s %4d %d s (%s)\n' "synth $label" "$rc" $((SECONDS - start)) \
    "$(du -sh "$work/model" | cut -f1)" >>"$summary"
  ((rc == 0)) || { fail "synth $label"; rm -rf "$work"; return; }
  # The page cache holds the shards just written: the job's reads are warm.
  start=$SECONDS
  timeout 480 "$qcal" quantize --device cuda --compute-dtype bf16 --model "$work/model" \
    --recipe "$work/w4g128.yaml" --calib "$work/model/calib.txt" --samples 128 --seq-len 2048 \
    --eval-text "$work/model/eval.txt" --eval-seq-len 512 --eval-max-windows 16 \
    --scratch-dir "$work/scratch" \
    --out "$work/out" --json >"$out/stream_${label}_quantize.json" 2>>"$log"
  rc=$?
  local wall=$((SECONDS - start))
  printf '%-34s %4d %d s wall\n' "quantize $label streaming" "$rc" "$wall" >>"$summary"
  if ((rc == 0)); then
    cp "$work/out/qcal_run.json" "$out/stream_${label}_run.json"
    ls -la "$work/out" >>"$log"
    python3 - "$work/out/qcal_run.json" >>"$summary" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s = r["seconds"]
stages = s["load"] + s["calibration_data"] + s["blocks"]
print("    stages: load %.1f, calibration %.1f, blocks %.1f (waiting for weights %.1f; forward %.1f,"
      " hessian %.1f, solve %.1f), export %.1f, hash %.1f, eval %.1f"
      % (s["load"], s["calibration_data"], s["blocks"], s["load_wait"], s["forward"], s["hessian"],
         s["solve"], s["export"], s["hash_inputs"], s.get("eval", 0)))
print("    quantize stages %.1f s; peak host RSS %.2f GiB; peak device memory %.2f GiB"
      % (stages, r["peak_rss_bytes"] / 2**30, r.get("peak_device_bytes", -1) / 2**30))
PY
    grep -E 'block [0-9]+/' "$log" | tail -3 | sed 's/^/    /' >>"$summary"
  else
    fail "quantize $label"
    tail -5 "$log" | sed 's/^/    /' >>"$summary"
  fi
  rm -rf "$work"
  start=$SECONDS
  # The bench's default recipe is the job's: GPTQ W4 g128, 128 x 2048.
  timeout 300 "$qcal" bench --shape "$shape" --compute-dtype bf16 \
    >"$out/stream_${label}_bench.txt" 2>>"$log"
  rc=$?
  printf '%-34s %4d %d s\n' "bench $shape bf16" "$rc" $((SECONDS - start)) >>"$summary"
  sed 's/^/    /' "$out/stream_${label}_bench.txt" | head -20 >>"$summary"
  ((rc == 0)) || fail "bench $shape"
}

wants stream13 && stream_job 13b "--preset 13b --threads 16" 13b
wants stream70 && stream_job 70b12 "--preset 70b --layers 12 --threads 16" 70b

if wants moebench; then
  # The MoE shapes (issue 17): 3 blocks each through the MoE driver, extrapolated; the output ends
  # with the fallback experts and the routed tokens per expert.
  for shape in mixtral-8x7b qwen3-30b-a3b; do
    time_for 120 || { note "bench $shape: skipped (session budget)"; continue; }
    start=$SECONDS
    limit=$((budget - SECONDS))
    ((limit > 540)) && limit=540
    timeout "$limit" "$qcal" bench --shape "$shape" --compute-dtype bf16 \
      >"$out/bench_$shape.txt" 2>"$out/bench_$shape.log"
    rc=$?
    printf '%-34s %4d %d s\n' "bench $shape bf16" "$rc" $((SECONDS - start)) >>"$summary"
    sed 's/^/    /' "$out/bench_$shape.txt" >>"$summary"
    ((rc == 0)) || fail "bench $shape"
  done
fi

sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if wants sanitizer && [[ -n $sanitizer ]]; then
  # The large shapes are too slow under the tools; the error tests provoke failed allocations,
  # which memcheck would report.
  time_for 100 && gtest "memcheck cuda_ops_test" "$out/memcheck_ops.log" 90 "$sanitizer" \
    --tool memcheck --error-exitcode 1 "$p/bin/cuda_ops_test" --gtest_color=no \
    --gtest_filter='-*SevenB*:*ErrorsAreStatuses*'
  time_for 100 && gtest "memcheck cuda_quant_test" "$out/memcheck_quant.log" 90 "$sanitizer" \
    --tool memcheck --error-exitcode 1 "$p/bin/cuda_quant_test" --gtest_color=no \
    --gtest_filter='-*Factorize*:*OutputError*'
  time_for 100 && gtest "memcheck cuda_low_rank_test" "$out/memcheck_low_rank.log" 90 \
    "$sanitizer" --tool memcheck --error-exitcode 1 "$p/bin/cuda_low_rank_test" --gtest_color=no
  time_for 130 && gtest "memcheck cuda_abq_test" "$out/memcheck_abq.log" 120 "$sanitizer" \
    --tool memcheck --error-exitcode 1 "$p/bin/cuda_abq_test" --gtest_color=no
  time_for 70 && gtest "racecheck attention" "$out/racecheck.log" 60 "$sanitizer" --tool \
    racecheck --error-exitcode 1 "$p/bin/cuda_ops_test" --gtest_color=no \
    --gtest_filter='*AttentionMatches*'
  time_for 100 && gtest "memcheck cuda_backward_test" "$out/memcheck_backward.log" 90 \
    "$sanitizer" --tool memcheck --error-exitcode 1 "$p/bin/cuda_backward_test" --gtest_color=no \
    --gtest_filter='-*SevenB*:*ErrorsAreStatuses*'
  # About 65 s on an H200 (one 2x300x300, 8/2 heads of 128 backward per dtype, twice).
  time_for 110 && gtest "racecheck attention backward" "$out/racecheck_backward.log" 100 \
    "$sanitizer" --tool racecheck --error-exitcode 1 "$p/bin/cuda_backward_test" \
    --gtest_color=no --gtest_filter='*AttentionBackwardIsBitIdentical*'
fi

if wants ncu; then
  # Hardware counters of the bf16 attention kernels at the 7B chunk (cuda_backward_test's timing
  # test runs one forward and one backward of 8 x 2048 tokens, 32 heads of 128): one launch of
  # each, with ncu's speed-of-light, occupancy, launch, warp-state and scheduler sections
  # (--clock-control none: the card's clocks as found). Reports go to ncu_<kernel>.txt.
  ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  for kernel in ${QCAL_NCU_KERNELS:-AttentionBf16Kernel DqBf16Kernel DkDvBf16Kernel}; do
    time_for 90 || { note "ncu $kernel: skipped (session budget)"; continue; }
    [[ -n $ncu_bin ]] || { note "ncu: not found"; break; }
    start=$SECONDS
    timeout 240 "$ncu_bin" --clock-control none -k "regex:^${kernel}" -c 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      "$p/bin/cuda_backward_test" --gtest_color=no --gtest_filter='*SevenBAttentionBackwardTiming*' \
      >"$out/ncu_$kernel.txt" 2>&1
    rc=$?
    printf '%-34s %4d %d s\n' "ncu $kernel" "$rc" $((SECONDS - start)) >>"$summary"
    cp "$out/ncu_$kernel.txt" "$dest/" 2>/dev/null
  done
fi

if wants gaps; then
  # Where the device idles in the 7B bench (issue 16): a CUPTI timeline of three blocks
  # (tools/gpu/cupti_trace: the device's kernels and copies, the host's CUDA calls; nsys cannot make
  # a report on the GPU machine), its idle gaps summed by the operations around them and by what
  # the host was doing meanwhile (tools/gpu/device_gaps.py).
  tracer="$p/bin/libqcal_cupti_trace.so"
  if [[ ! -f $tracer ]]; then
    note "gaps: $tracer is not in the bundle (built with the CUDA backend where CUPTI is found)"
  elif time_for 120; then
    start=$SECONDS
    CUDA_INJECTION64_PATH="$tracer" QCAL_CUPTI_TRACE="$out/gaps_trace.csv" timeout 200 \
      "$qcal" bench --shape 7b --blocks 3 --compute-dtype bf16 >"$out/gaps_bench.txt" 2>&1
    rc=$?
    printf '%-34s %4d %d s\n' "gaps (CUPTI, 7b, 3 blocks)" "$rc" $((SECONDS - start)) >>"$summary"
    grep -hE '^(per block|whole model)|qcal_cupti_trace' "$out/gaps_bench.txt" | sed 's/^/    /' \
      >>"$summary"
    python3 "$root/tools/gpu/device_gaps.py" "$out/gaps_trace.csv" 20 2>&1 | head -40 |
      sed 's/^/    /' >>"$summary"
    # The first block's warm-up against the next two (tools/gpu/block_split.py), then the same
    # bench with every module loaded at start-up instead of at a kernel's first launch.
    python3 "$root/tools/gpu/block_split.py" "$out/gaps_trace.csv" FillUniformKernel 12 2>&1 |
      head -45 | sed 's/^/    /' >>"$summary"
    CUDA_MODULE_LOADING=EAGER timeout 120 "$qcal" bench --shape 7b --blocks 3 --compute-dtype bf16 \
      >"$out/gaps_eager.txt" 2>&1
    echo "    CUDA_MODULE_LOADING=EAGER (rc $?): $(grep -h '^per block' "$out/gaps_eager.txt")" \
      >>"$summary"
    gzip -f "$out/gaps_trace.csv"
    # The same split for error reconstruction (rank 64) and ASER W4A8, whose first blocks add
    # their own first uses (the randomized SVD's FP64 products, the smoothing pass).
    printf '%s\n' 'method: gptq' 'weights: {bits: 4, group_size: 128}' \
      'error_reconstruction: {rank: 64}' >"$out/gaps_er.yaml"
    printf '%s\n' 'method: gptq' 'weights: {bits: 4, group_size: -1}' 'activations: {bits: 8}' \
      'smoothing: {method: aser, outlier_channels: 32}' 'error_reconstruction: {rank: 64}' \
      >"$out/gaps_aser.yaml"
    for job in ${QCAL_GAPS_JOBS:-}; do
      [[ $job == er || $job == aser ]] || { note "gaps: unknown job '$job' (er or aser)"; continue; }
      time_for 60 || { note "gaps $job: skipped (session budget)"; continue; }
      CUDA_INJECTION64_PATH="$tracer" QCAL_CUPTI_TRACE="$out/gaps_trace_$job.csv" timeout 200 \
        "$qcal" bench --shape 7b --blocks 3 --compute-dtype bf16 --recipe "$out/gaps_$job.yaml" \
        >"$out/gaps_bench_$job.txt" 2>&1
      echo "    gaps $job (rc $?): $(grep -h '^per block' "$out/gaps_bench_$job.txt")" >>"$summary"
      python3 "$root/tools/gpu/block_split.py" "$out/gaps_trace_$job.csv" FillUniformKernel 12 \
        2>&1 | head -45 | sed 's/^/    /' >>"$summary"
      gzip -f "$out/gaps_trace_$job.csv"
    done
  else
    note "gaps: skipped (session budget)"
  fi
fi

{
  echo "--- numbers"
  grep -hE '^(device kind|f32 |bf16 )' "$out/cuda_ops_test.log" 2>/dev/null
  grep -hE 'attention backward 7B|with saved statistics' "$out/cuda_backward_test.log" 2>/dev/null
  grep -hE 'perplexity [0-9.]+, [0-9]+ tokens' "$out/cuda_model_test.log" 2>/dev/null
  grep -hE '^\[  FAILED  \] .* \([0-9]+ ms\)$' "$out"/*.log 2>/dev/null
  grep -hE 'ERROR SUMMARY|RACECHECK SUMMARY' "$out"/memcheck_*.log "$out/racecheck.log" 2>/dev/null
  echo "session: ${SECONDS} s, status $status"
} >>"$summary"
cp "$summary" "$dest/summary.txt"
tar czf "$dest/logs.tar.gz" -C "$out" .
rm -rf "$p" "$out"
echo "=== qcal GPU session summary"
cat "$dest/summary.txt"
exit $status
