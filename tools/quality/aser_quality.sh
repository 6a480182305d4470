#!/usr/bin/env bash
# Reproduces the ASER / error-reconstruction quality tables of docs/QUALITY.md (issue 6): perplexity
# of FP, RTN, GPTQ, GPTQ + error reconstruction (plain SVD, LQER diagonal, whitening) and ASER
# (smoothing + whitening over GPTQ), the extra parameters of the low-rank branch, a rank sweep on the
# W3 row, and the time per stage of each ASER run.
#
#   tools/quality/aser_quality.sh [BUILD_DIR] [SHARED_DIR] > tables.md
#
# Settings (DESIGN section 4 protocol, as tools/quality/weights_quality.sh):
#   stories260k:    calibrate on tinystories-calib.txt, 128 x 256; evaluate tinystories-eval.txt, L = 256, all windows
#   sotu-llama-16m: calibrate on sotu-calib.txt, 128 x 512; evaluate sotu-eval.txt, L = 512, K = 32
# Rows: W4A16 g128, W3A16 g128, W2A16 g64, W4A8 per-channel (group_size -1; every column of that row,
# RTN and GPTQ included, uses 8-bit per-token activations). Rank 16 on stories260k (plus a W3A16 g128
# row at rank 4), 64 on sotu-llama-16m; rank sweep on the W3 row: 8/16/32 and 16/32/64. ASER
# outlier_channels = min(8 resp. 32, rank / 2), except 4 at rank 4. Seed 0, 2 threads, CPU.
# Every distinct (model, recipe) is run once; its result is cached by recipe text under WORK and
# reused wherever it appears again (the GPTQ column of the W3 row is the sweep's GPTQ column).
# The markdown tables go to stdout; progress to stderr.
# Environment: MODELS (default "stories260k sotu-llama-16m"), DEVICE (default cpu), THREADS (2),
# QCAL (default BUILD_DIR/bin/qcal), WORK (cache directory; default a temporary one, removed at exit;
# a given WORK is kept, so an interrupted run resumes from its cache).
set -euo pipefail
BUILD=${1:-build}
SHARED=${2:-../shared}
# shellcheck source=tools/quality/lib.sh
source "$(dirname "$0")/lib.sh"
quality_setup

# run MODEL_DIR CALIB SAMPLES LEN EVAL EVAL_LEN MAXWIN METHOD BITS GROUP ABITS SMOOTH OUTLIERS RANK WHITEN
# -> R (the cache entry: R.json is the --json output, R.run.json the run's qcal_run.json), or R=""
# when the run failed (its error is printed to stderr and kept in R.log).
# SMOOTH: none | aser; RANK: 0 for no error reconstruction.
run() {
  local model=$1 calib=$2 samples=$3 len=$4 eval=$5 elen=$6 maxwin=$7
  local method=$8 bits=$9 group=${10} abits=${11} smooth=${12} outliers=${13} rank=${14} whiten=${15}
  local recipe
  recipe=$(printf 'method: %s\nweights:\n  bits: %s\n  group_size: %s\nactivations:\n  bits: %s\n' \
    "$method" "$bits" "$group" "$abits")
  if [[ $smooth != none ]]; then
    recipe+=$(printf '\nsmoothing:\n  method: %s\n  outlier_channels: %s' "$smooth" "$outliers")
  fi
  if ((rank > 0)); then
    recipe+=$(printf '\nerror_reconstruction:\n  rank: %s\n  whitening: %s' "$rank" "$whiten")
  fi
  local label
  label="$(basename "$model") $method W${bits}A${abits} g$group smooth=$smooth/$outliers rank=$rank/$whiten"
  quantize_cached "$label" "$recipe" "$model" "$calib" "$samples" "$len" "$eval" "$elen" "$maxwin"
}

extra() {  # extra ENTRY -> extra_params_pct with 1 decimal, or "failed"
  if [[ -n $1 ]]; then printf '%.1f' "$(num extra_params_pct "$1.json")"; else echo failed; fi
}
secs() {  # secs ENTRY KEY -> the stage's seconds from qcal_run.json with 2 decimals
  if [[ -n $1 ]]; then printf '%.2f' "$(num "$2" "$1.run.json")"; else echo -; fi
}

# cells MODEL_ARGS(7) BITS GROUP ABITS RANK OUTLIERS -> FP, E_RTN, E_GPTQ, E_SVD, E_DIAG, E_CHOL, E_ASER
cells() {
  local m=("${@:1:7}") bits=$8 group=$9 abits=${10} rank=${11} outliers=${12}
  run "${m[@]}" rtn "$bits" "$group" "$abits" none 0 0 none
  E_RTN=$R
  run "${m[@]}" gptq "$bits" "$group" "$abits" none 0 0 none
  E_GPTQ=$R
  run "${m[@]}" gptq "$bits" "$group" "$abits" none 0 "$rank" none
  E_SVD=$R
  run "${m[@]}" gptq "$bits" "$group" "$abits" none 0 "$rank" diagonal
  E_DIAG=$R
  run "${m[@]}" gptq "$bits" "$group" "$abits" none 0 "$rank" cholesky
  E_CHOL=$R
  run "${m[@]}" gptq "$bits" "$group" "$abits" aser "$outliers" "$rank" cholesky
  E_ASER=$R
  FP=failed
  local e
  for e in $E_RTN $E_GPTQ $E_SVD $E_DIAG $E_CHOL $E_ASER; do
    FP=$(printf '%.4f' "$(num perplexity_fp "$e.json")")
    break
  done
}

extra_cell() {  # the ER columns' extra params (%): one number when all agree, else SVD / diag / chol / ASER
  local a b c d
  a=$(extra "$E_SVD") b=$(extra "$E_DIAG") c=$(extra "$E_CHOL") d=$(extra "$E_ASER")
  if [[ $a == "$b" && $b == "$c" && $c == "$d" ]]; then echo "$a"; else echo "$a / $b / $c / $d"; fi
}

outliers_for() {  # outliers_for RANK DEFAULT -> min(DEFAULT, RANK / 2), but 4 at rank 4
  local rank=$1 def=$2
  if ((rank == 4)); then echo 4; elif ((rank / 2 < def)); then echo $((rank / 2)); else echo "$def"; fi
}

# tables NAME MODEL CALIB SAMPLES LEN EVAL EVAL_LEN MAXWIN RANK OUTLIERS "SWEEP RANKS" ROWS...
# ROWS: BITS:GROUP:ABITS[:RANK]
tables() {
  local name=$1 m=("${@:2:7}") rank0=$9 out0=${10} sweep=${11}
  shift 11
  local timing=()
  echo "### $name"
  echo
  echo "| Weights | Act. | Group | Rank | FP | RTN | GPTQ | GPTQ + ER plain SVD | GPTQ + ER LQER (diagonal) | GPTQ + ER whitening (cholesky) | ASER | Extra params (%) |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
  local cfg
  for cfg in "$@"; do
    IFS=: read -r bits group abits rank <<<"$cfg"
    rank=${rank:-$rank0}
    local outliers
    outliers=$(outliers_for "$rank" "$out0")
    echo "$name W${bits}A$abits g$group rank $rank (ASER outliers $outliers)" >&2
    cells "${m[@]}" "$bits" "$group" "$abits" "$rank" "$outliers"
    printf '| W%s | A%s | %s | %s | %s | %s | %s | %s | %s | %s | %s (%s outl.) | %s |\n' "$bits" "$abits" \
      "$group" "$rank" "$FP" "$(ppl "$E_RTN")" "$(ppl "$E_GPTQ")" "$(ppl "$E_SVD")" "$(ppl "$E_DIAG")" \
      "$(ppl "$E_CHOL")" "$(ppl "$E_ASER")" "$outliers" "$(extra_cell)"
    timing+=("| W${bits}A$abits g$group r$rank | $(secs "$E_GPTQ" solve) | $(secs "$E_CHOL" reconstruct) | $(secs "$E_ASER" smooth) | $(secs "$E_ASER" forward) | $(secs "$E_ASER" hessian) | $(secs "$E_ASER" solve) | $(secs "$E_ASER" reconstruct) | $(secs "$E_ASER" eval) |")
  done
  echo
  echo "Rank sweep, W3A16 g128 (FP, RTN and GPTQ as in the W3A16 row above):"
  echo
  echo "| Rank | ASER outliers | GPTQ | GPTQ + ER plain SVD | GPTQ + ER LQER (diagonal) | GPTQ + ER whitening (cholesky) | ASER | Extra params (%) |"
  echo "|---|---|---|---|---|---|---|---|"
  local rank
  for rank in $sweep; do
    local outliers
    outliers=$(outliers_for "$rank" "$out0")
    echo "$name sweep W3A16 g128 rank $rank (ASER outliers $outliers)" >&2
    cells "${m[@]}" 3 128 16 "$rank" "$outliers"
    printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$rank" "$outliers" "$(ppl "$E_GPTQ")" \
      "$(ppl "$E_SVD")" "$(ppl "$E_DIAG")" "$(ppl "$E_CHOL")" "$(ppl "$E_ASER")" "$(extra_cell)"
  done
  echo
  echo "Seconds per stage (qcal_run.json; GPTQ: its solve stage; ER: the whitening run's reconstruct part of solve; the rest: the ASER run):"
  echo
  echo "| Row | GPTQ solve | ER reconstruct | ASER smooth | ASER forward | ASER hessian | ASER solve | ASER reconstruct | ASER eval |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${timing[@]}"
  echo
}

if [[ " $MODELS " == *" stories260k "* ]]; then
  tables stories260k "$SHARED/models/stories260k" "$SHARED/data/tinystories-calib.txt" 128 256 \
    "$SHARED/data/tinystories-eval.txt" 256 -1 16 8 "8 16 32" 4:128:16 3:128:16 2:64:16 4:-1:8 3:128:16:4
fi
if [[ " $MODELS " == *" sotu-llama-16m "* ]]; then
  tables sotu-llama-16m "$SHARED/models/sotu-llama-16m" "$SHARED/data/sotu-calib.txt" 128 512 \
    "$SHARED/data/sotu-eval.txt" 512 32 64 32 "16 32 64" 4:128:16 3:128:16 2:64:16 4:-1:8
fi
if ((FAILED)); then
  echo "some runs failed (see above; their cells read \"failed\")" >&2
  exit 1
fi
