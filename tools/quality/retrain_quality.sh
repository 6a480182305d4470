#!/usr/bin/env bash
# Reproduces the retraining quality table of docs/QUALITY.md (issue 13): perplexity, extra
# parameters and time per stage of GPTQ, GPTQ + error reconstruction (Cholesky whitening), ApiQ
# (block retraining of a LoRA on all seven linears and learnable clipping, 20 output epochs),
# saliency-aware retraining (the paper's recipe: λ = 0.1, 15 weight-preservation then 5
# output-preservation epochs) and ApiQ over OAC (sample-wise output-adaptive Hessian). The LoRA and
# the error reconstruction use the same rank per model, so their extra parameters compare.
#
#   tools/quality/retrain_quality.sh [BUILD_DIR] [SHARED_DIR] > tables.md
#
# Settings (DESIGN section 4 protocol, as tools/quality/oac_quality.sh):
#   stories260k:    calibrate on tinystories-calib.txt, SAMPLES_STORIES x 256 (default 128);
#                   evaluate tinystories-eval.txt, L = 256, all windows; W2 g32 and W3 g32; rank 16
#   sotu-llama-16m: calibrate on sotu-calib.txt, SAMPLES_SOTU x 512 (default 128); evaluate
#                   sotu-eval.txt, L = 512, K = 32; W2 g64 and W3 g128; rank 64
# Seed 0, 2 threads, CPU, fp32. Every distinct (model, recipe) is run once and cached by recipe text
# under WORK. The markdown tables go to stdout; progress to stderr.
# Environment: MODELS (default "stories260k sotu-llama-16m"), DEVICE (cpu), THREADS (2),
# SAMPLES_STORIES, SAMPLES_SOTU, QCAL (default BUILD_DIR/bin/qcal), WORK (cache directory; default a
# temporary one, removed at exit).
set -euo pipefail
BUILD=${1:-build}
SHARED=${2:-../shared}
# shellcheck source=tools/quality/lib.sh
source "$(dirname "$0")/lib.sh"
quality_setup
SAMPLES_STORIES=${SAMPLES_STORIES:-128}
SAMPLES_SOTU=${SAMPLES_SOTU:-128}

# recipe ROW BITS GROUP RANK -> the recipe text of a row (gptq, er, apiq, saliency, apiq_oac)
recipe() {
  local row=$1 bits=$2 group=$3 rank=$4
  printf 'method: gptq\nweights: {bits: %s, group_size: %s}\n' "$bits" "$group"
  case $row in
    gptq) ;;
    er) printf 'error_reconstruction: {rank: %s, whitening: cholesky}\n' "$rank" ;;
    apiq) printf 'retrain: {method: apiq, rank: %s, epochs: {output: 20}}\n' "$rank" ;;
    saliency)
      printf 'retrain: {method: saliency, rank: %s, lambda: 0.1, epochs: {weight: 15, output: 5}}\n' \
        "$rank"
      ;;
    apiq_oac)
      printf 'hessian: output_adaptive\nretrain: {method: apiq, rank: %s, epochs: {output: 20}}\n' \
        "$rank"
      ;;
  esac
}

# run MODEL_DIR CALIB SAMPLES LEN EVAL EVAL_LEN MAXWIN ROW BITS GROUP RANK
# -> R (the cache entry: R.json is the --json output, R.run.json the run's qcal_run.json, R.secs
# its wall seconds), or R="" when the run failed (its error goes to stderr and stays in R.log).
run() {
  local model=$1 calib=$2 samples=$3 len=$4 eval=$5 elen=$6 maxwin=$7
  local row=$8 bits=$9 group=${10} rank=${11}
  local text
  text=$(recipe "$row" "$bits" "$group" "$rank")
  local label
  label="$(basename "$model") W$bits g$group $row"
  quantize_cached "$label" "$text" "$model" "$calib" "$samples" "$len" "$eval" "$elen" "$maxwin"
}

# cells ENTRY -> "| perplexity | extra parameters % | gradient pass s | solve s | retrain s | job s |"
cells() {
  if [[ -z $1 ]]; then
    echo "| failed | - | - | - | - | - |"
    return
  fi
  python3 - "$1" <<'PY'
import json, sys
e = sys.argv[1]
out = json.load(open(e + ".json"))
run = json.load(open(e + ".run.json"))
secs = run["seconds"]
extra = out["summary"].get("extra_params_pct")
grad = run.get("gradient_pass", {}).get("seconds")
f = lambda v: "-" if v is None else "%.1f" % v
print("| %.4f | %s | %s | %s | %s | %s |" % (
    out["perplexity"], "-" if extra is None else "%.2f" % extra, f(grad), f(secs.get("solve")),
    f(secs.get("retrain")), open(e + ".secs").read().strip()))
PY
}

# table NAME MODEL CALIB SAMPLES LEN EVAL EVAL_LEN MAXWIN RANK SETTINGS...   (SETTINGS: BITS:GROUP)
table() {
  local name=$1 m=("${@:2:7}") rank=$9
  shift 9
  echo "### $name (calibration ${m[2]} x ${m[3]}; LoRA and reconstruction rank $rank)"
  echo
  echo "| Weights | Group | Row | Perplexity | Extra parameters (%) | Gradient pass (s) | Solve (s) | Retrain (s) | Job (s) |"
  echo "|---|---|---|---|---|---|---|---|---|"
  local cfg row
  for cfg in "$@"; do
    IFS=: read -r bits group <<<"$cfg"
    echo "$name W$bits g$group" >&2
    local fp=""
    for row in gptq er apiq saliency apiq_oac; do
      run "${m[@]}" "$row" "$bits" "$group" "$rank"
      if [[ -z $fp && -n $R ]]; then fp=$(printf '%.4f' "$(num perplexity_fp "$R.json")"); fi
      local label
      case $row in
        gptq) label="GPTQ" ;;
        er) label="GPTQ + ER (Cholesky whitening)" ;;
        apiq) label="ApiQ (20 output epochs)" ;;
        saliency) label="Saliency (λ 0.1; 15 weight + 5 output epochs)" ;;
        apiq_oac) label="ApiQ over OAC (sample-wise)" ;;
      esac
      echo "| W$bits | $group | $label $(cells "$R")"
    done
    echo "| W$bits | $group | full precision | $fp | - | - | - | - | - |"
  done
  echo
}

if [[ " $MODELS " == *" stories260k "* ]]; then
  table stories260k "$SHARED/models/stories260k" "$SHARED/data/tinystories-calib.txt" \
    "$SAMPLES_STORIES" 256 "$SHARED/data/tinystories-eval.txt" 256 -1 16 2:32 3:32
fi
if [[ " $MODELS " == *" sotu-llama-16m "* ]]; then
  table sotu-llama-16m "$SHARED/models/sotu-llama-16m" "$SHARED/data/sotu-calib.txt" \
    "$SAMPLES_SOTU" 512 "$SHARED/data/sotu-eval.txt" 512 32 64 2:64 3:128
fi
if ((FAILED)); then
  echo "some runs failed (see above; their cells read \"failed\")" >&2
  exit 1
fi
