#!/usr/bin/env bash
# Reproduces the ABQ quality table of docs/QUALITY.md (issue 14): perplexity of RTN and GPTQ at
# W2A16, W2*A16 (the balanced grid: five levels), W2A8 and W2*A8, plus W4A8 and W4A4, on the shared
# models. Activations are quantized per token (activations: {bits: 8 or 4}) in the fake-quant
# forward; the weights are the exported GPTQ v1 checkpoint's (balanced: 3-bit codes 0..4).
#
#   tools/quality/abq_quality.sh [BUILD_DIR] [SHARED_DIR] > tables.md
#
# Settings (DESIGN section 4 protocol, as tools/quality/weights_quality.sh):
#   stories260k:    calibrate on tinystories-calib.txt, 128 x 256; evaluate tinystories-eval.txt,
#                   L = 256, all windows; weights g32
#   sotu-llama-16m: calibrate on sotu-calib.txt, 128 x 512; evaluate sotu-eval.txt, L = 512,
#                   K = 32; weights g64
# Seed 0, 2 threads, CPU, fp32. Every distinct (model, recipe) is run once and cached by recipe text
# under WORK. The markdown tables go to stdout; progress to stderr.
# Environment: MODELS (default "stories260k sotu-llama-16m"), DEVICE (cpu), THREADS (2),
# QCAL (default BUILD_DIR/bin/qcal), WORK (cache directory; default a temporary one, removed at exit).
set -euo pipefail
BUILD=${1:-build}
SHARED=${2:-../shared}
# shellcheck source=tools/quality/lib.sh
source "$(dirname "$0")/lib.sh"
quality_setup

# run MODEL_DIR CALIB SAMPLES LEN EVAL EVAL_LEN MAXWIN METHOD BITS GRID GROUP ACT_BITS
# -> R (the cache entry: R.json is the --json output), or R="" when the run failed (its error goes
# to stderr and stays in R.log).
run() {
  local model=$1 calib=$2 samples=$3 len=$4 eval=$5 elen=$6 maxwin=$7
  local method=$8 bits=$9 grid=${10} group=${11} abits=${12}
  local recipe
  recipe=$(printf 'method: %s\nweights:\n  bits: %s\n  group_size: %s\n  grid: %s\nactivations:\n  bits: %s\n' \
    "$method" "$bits" "$group" "$grid" "$abits")
  local label
  label="$(basename "$model") $method W$bits $grid g$group A$abits"
  quantize_cached "$label" "$recipe" "$model" "$calib" "$samples" "$len" "$eval" "$elen" "$maxwin"
}

secs() {  # secs ENTRY -> wall seconds of the job, or "-"
  if [[ -n $1 ]]; then cat "$1.secs"; else echo -; fi
}

# table NAME MODEL CALIB SAMPLES LEN EVAL EVAL_LEN MAXWIN GROUP
table() {
  local name=$1 m=("${@:2:7}") group=$9
  echo "### $name (weights g$group)"
  echo
  echo "| Setting | Weights | Activations | FP | RTN | GPTQ | RTN s | GPTQ s |"
  echo "|---|---|---|---|---|---|---|---|"
  local cfg kind=-
  for cfg in W2A16:2:uniform:16 W2*A16:2:balanced:16 W2A8:2:uniform:8 W2*A8:2:balanced:8 \
    W4A8:4:uniform:8 W4A4:4:uniform:4; do
    IFS=: read -r label bits grid abits <<<"$cfg"
    run "${m[@]}" rtn "$bits" "$grid" "$group" "$abits"; local r=$R
    run "${m[@]}" gptq "$bits" "$grid" "$group" "$abits"; local g=$R
    local fp=failed e
    for e in $g $r; do
      fp=$(printf '%.4f' "$(num perplexity_fp "$e.json")")
      break
    done
    local wdesc="$bits-bit $grid"
    [[ $grid == balanced ]] && wdesc="2-bit balanced (codes 0..4, stored as 3-bit)"
    local adesc="A$abits per token"
    [[ $abits == 16 ]] && adesc="fp32"
    printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$label" "$wdesc" "$adesc" "$fp" \
      "$(ppl "$r")" "$(ppl "$g")" "$(secs "$r")" "$(secs "$g")"
    [[ -n $g ]] && kind=$(device_kind "$g")
  done
  echo
  # GPTQ's sums go through OpenBLAS, whose kernels (picked at run time for the CPU) round
  # differently: at 2 bits the chosen codes follow. Results compare only within one device kind.
  echo "Device kind: \`$kind\`, $THREADS threads."
  echo
}

if [[ " $MODELS " == *" stories260k "* ]]; then
  table stories260k "$SHARED/models/stories260k" "$SHARED/data/tinystories-calib.txt" 128 256 \
    "$SHARED/data/tinystories-eval.txt" 256 -1 32
fi
if [[ " $MODELS " == *" sotu-llama-16m "* ]]; then
  table sotu-llama-16m "$SHARED/models/sotu-llama-16m" "$SHARED/data/sotu-calib.txt" 128 512 \
    "$SHARED/data/sotu-eval.txt" 512 32 64
fi
if ((FAILED)); then
  echo "some runs failed (see above; their cells read \"failed\")" >&2
  exit 1
fi
