#!/usr/bin/env bash
# Reproduces the weight-quantization quality table of docs/QUALITY.md (issue 3): perplexity of
# FP, RTN, GPTQ, GPTQ act-order and the cuberoot grid (RTN and GPTQ) on the shared models.
#
#   tools/quality/weights_quality.sh [BUILD_DIR] [SHARED_DIR] > table.md
#
# Settings (DESIGN section 4 protocol):
#   stories260k:    calibrate on tinystories-calib.txt, 128 x 256; evaluate tinystories-eval.txt, L = 256, all windows
#   sotu-llama-16m: calibrate on sotu-calib.txt, 128 x 512; evaluate sotu-eval.txt, L = 512, K = 32
# Seed 0, 2 threads, CPU. The markdown table goes to stdout; progress to stderr.
# Environment: MODELS (default "stories260k sotu-llama-16m"), DEVICE (default cpu), THREADS (2).
set -euo pipefail
BUILD=${1:-build}
SHARED=${2:-../shared}
QCAL="$BUILD/bin/qcal"
THREADS=${THREADS:-2}
DEVICE=${DEVICE:-cpu}
MODELS=${MODELS:-"stories260k sotu-llama-16m"}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

num() {  # num KEY JSON -> the number after "KEY":
  sed -n "s/.*\"$1\":\([0-9.eE+-]*\).*/\1/p" <<<"$2"
}

run() {  # run MODEL CALIB SAMPLES LEN EVAL EVAL_LEN MAXWIN METHOD BITS GROUP ACT GRID -> perplexity
  local model=$1 calib=$2 samples=$3 len=$4 eval=$5 elen=$6 maxwin=$7 method=$8 bits=$9 group=${10} act=${11} grid=${12}
  local recipe="$WORK/recipe.yaml"
  printf 'method: %s\nweights:\n  bits: %s\n  group_size: %s\n  grid: %s\ngptq:\n  act_order: %s\n' \
    "$method" "$bits" "$group" "$grid" "$act" >"$recipe"
  local start=$SECONDS
  local json windows=()
  ((maxwin > 0)) && windows=(--eval-max-windows "$maxwin")  # -1: all windows (the flag's default)
  json=$("$QCAL" quantize --model "$model" --recipe "$recipe" --calib "$calib" --samples "$samples" \
    --seq-len "$len" --eval-text "$eval" --eval-seq-len "$elen" "${windows[@]}" \
    --out "$WORK/out" --overwrite --threads "$THREADS" --device "$DEVICE" --json 2>"$WORK/log") || {
    cat "$WORK/log" >&2
    exit 1
  }
  local secs=$((SECONDS - start))
  echo "  $method W$bits g$group act_order=$act grid=$grid: $(num perplexity "$json") (${secs} s)" >&2
  FP=$(num perplexity_fp "$json")
  PPL=$(num perplexity "$json")
}

table() {  # table NAME MODEL CALIB SAMPLES LEN EVAL EVAL_LEN MAXWIN CONFIGS...
  local name=$1 model=$2 calib=$3 samples=$4 len=$5 eval=$6 elen=$7 maxwin=$8
  shift 8
  echo "### $name"
  echo
  echo "| Model | Bits | Group | FP | RTN | GPTQ | GPTQ act-order | cuberoot RTN | cuberoot GPTQ |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for cfg in "$@"; do
    local bits=${cfg%:*} group=${cfg#*:}
    echo "$name W$bits g$group" >&2
    local cells=()
    run "$model" "$calib" "$samples" "$len" "$eval" "$elen" "$maxwin" rtn "$bits" "$group" false uniform
    local fp=$FP
    cells+=("$PPL")
    run "$model" "$calib" "$samples" "$len" "$eval" "$elen" "$maxwin" gptq "$bits" "$group" false uniform
    cells+=("$PPL")
    run "$model" "$calib" "$samples" "$len" "$eval" "$elen" "$maxwin" gptq "$bits" "$group" true uniform
    cells+=("$PPL")
    run "$model" "$calib" "$samples" "$len" "$eval" "$elen" "$maxwin" rtn "$bits" "$group" false cuberoot
    cells+=("$PPL")
    run "$model" "$calib" "$samples" "$len" "$eval" "$elen" "$maxwin" gptq "$bits" "$group" false cuberoot
    cells+=("$PPL")
    printf '| %s | %s | %s | %.4f | %.4f | %.4f | %.4f | %.4f | %.4f |\n' "$name" "$bits" "$group" "$fp" "${cells[@]}"
  done
  echo
}

if [[ " $MODELS " == *" stories260k "* ]]; then
table stories260k "$SHARED/models/stories260k" "$SHARED/data/tinystories-calib.txt" 128 256 \
  "$SHARED/data/tinystories-eval.txt" 256 -1 4:32 3:32 2:32
fi
if [[ " $MODELS " == *" sotu-llama-16m "* ]]; then
table sotu-llama-16m "$SHARED/models/sotu-llama-16m" "$SHARED/data/sotu-calib.txt" 128 512 \
  "$SHARED/data/sotu-eval.txt" 512 32 4:128 3:128 2:64
fi
