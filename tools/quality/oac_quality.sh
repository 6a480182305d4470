#!/usr/bin/env bash
# Reproduces the OAC quality table of docs/QUALITY.md (issue 12): perplexity of GPTQ against
# output-adaptive calibration with the sample-wise Hessian H_oac and the per-token H_tok, each with
# and without act-order, and GPTQ and sample-wise OAC with rank-16 and rank-64 error reconstruction
# (Cholesky whitening), plus the gradient pass's time.
#
#   tools/quality/oac_quality.sh [BUILD_DIR] [SHARED_DIR] > tables.md
#
# Settings (DESIGN section 4 protocol, as tools/quality/weights_quality.sh):
#   stories260k:    calibrate on tinystories-calib.txt, 128 x 256; evaluate tinystories-eval.txt,
#                   L = 256, all windows; W2 g32 and W3 g32
#   sotu-llama-16m: calibrate on sotu-calib.txt, 128 x 512; evaluate sotu-eval.txt, L = 512,
#                   K = 32; W2 g64 and W3 g128
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

# run MODEL_DIR CALIB SAMPLES LEN EVAL EVAL_LEN MAXWIN BITS GROUP HESSIAN ACT_ORDER RANK
# -> R (the cache entry: R.json is the --json output, R.run.json the run's qcal_run.json), or R=""
# when the run failed (its error goes to stderr and stays in R.log). RANK 0: no reconstruction.
run() {
  local model=$1 calib=$2 samples=$3 len=$4 eval=$5 elen=$6 maxwin=$7
  local bits=$8 group=$9 hessian=${10} act_order=${11} rank=${12}
  local recipe
  recipe=$(printf 'method: gptq\nhessian: %s\nweights:\n  bits: %s\n  group_size: %s\ngptq:\n  act_order: %s\n' \
    "$hessian" "$bits" "$group" "$act_order")
  if ((rank > 0)); then
    recipe+=$(printf '\nerror_reconstruction:\n  rank: %s\n  whitening: cholesky' "$rank")
  fi
  local label
  label="$(basename "$model") W$bits g$group hessian=$hessian act_order=$act_order rank=$rank"
  quantize_cached "$label" "$recipe" "$model" "$calib" "$samples" "$len" "$eval" "$elen" "$maxwin"
}

pass_secs() {  # pass_secs ENTRY -> the gradient pass's seconds (qcal_run.json gradient_pass), or "-"
  if [[ -n $1 ]]; then
    python3 -c 'import json,sys; print("%.1f" % json.load(open(sys.argv[1]))["gradient_pass"]["seconds"])' \
      "$1.run.json"
  else
    echo -
  fi
}
job_secs() {  # job_secs ENTRY -> the whole job's wall seconds (qcal quantize, evaluation included)
  if [[ -n $1 ]]; then cat "$1.secs"; else echo -; fi
}

# table NAME MODEL CALIB SAMPLES LEN EVAL EVAL_LEN MAXWIN SETTINGS...   (SETTINGS: BITS:GROUP)
table() {
  local name=$1 m=("${@:2:7}")
  shift 8
  local timing=()
  echo "### $name"
  echo
  echo "| Weights | Group | FP | GPTQ | GPTQ act-order | OAC | OAC act-order | OAC per-token | OAC per-token act-order | GPTQ + ER r16 | OAC + ER r16 | GPTQ + ER r64 | OAC + ER r64 |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  local cfg
  for cfg in "$@"; do
    IFS=: read -r bits group <<<"$cfg"
    echo "$name W$bits g$group" >&2
    run "${m[@]}" "$bits" "$group" layer false 0; local g=$R
    run "${m[@]}" "$bits" "$group" layer true 0; local ga=$R
    run "${m[@]}" "$bits" "$group" output_adaptive false 0; local o=$R
    run "${m[@]}" "$bits" "$group" output_adaptive true 0; local oa=$R
    run "${m[@]}" "$bits" "$group" output_adaptive_token false 0; local t=$R
    run "${m[@]}" "$bits" "$group" output_adaptive_token true 0; local ta=$R
    run "${m[@]}" "$bits" "$group" layer false 16; local g16=$R
    run "${m[@]}" "$bits" "$group" output_adaptive false 16; local r16=$R
    run "${m[@]}" "$bits" "$group" layer false 64; local g64=$R
    run "${m[@]}" "$bits" "$group" output_adaptive false 64; local r64=$R
    local fp=failed e
    for e in $g $o $t; do
      fp=$(printf '%.4f' "$(num perplexity_fp "$e.json")")
      break
    done
    printf '| W%s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$bits" "$group" \
      "$fp" "$(ppl "$g")" "$(ppl "$ga")" "$(ppl "$o")" "$(ppl "$oa")" "$(ppl "$t")" "$(ppl "$ta")" \
      "$(ppl "$g16")" "$(ppl "$r16")" "$(ppl "$g64")" "$(ppl "$r64")"
    timing+=("| W$bits g$group | $(job_secs "$g") | $(pass_secs "$o") | $(job_secs "$o") | $(pass_secs "$t") | $(job_secs "$t") |")
  done
  echo
  echo "Seconds (the gradient pass from qcal_run.json; jobs as wall time of \`qcal quantize\`, evaluation included):"
  echo
  echo "| Row | GPTQ job | OAC gradient pass | OAC job | OAC per-token gradient pass | OAC per-token job |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${timing[@]}"
  echo
}

if [[ " $MODELS " == *" stories260k "* ]]; then
  table stories260k "$SHARED/models/stories260k" "$SHARED/data/tinystories-calib.txt" 128 256 \
    "$SHARED/data/tinystories-eval.txt" 256 -1 2:32 3:32
fi
if [[ " $MODELS " == *" sotu-llama-16m "* ]]; then
  table sotu-llama-16m "$SHARED/models/sotu-llama-16m" "$SHARED/data/sotu-calib.txt" 128 512 \
    "$SHARED/data/sotu-eval.txt" 512 32 2:64 3:128
fi
if ((FAILED)); then
  echo "some runs failed (see above; their cells read \"failed\")" >&2
  exit 1
fi
