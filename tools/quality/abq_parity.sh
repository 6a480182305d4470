#!/usr/bin/env bash
# Reproduces the ABQ parity table of docs/QUALITY.md (issue 14, acceptance 3): sotu-llama-16m
# quantized by GPTQ at W4A8 g128 and W2*A8 g64, then evaluated through the dequantizing path
# (`--kernels dequant`, the reference) and through the ABQ kernels (`--kernels abq`: b1, and int8
# on the GPU), with the relative difference of the perplexities and whether the mean NLLs are the
# same double.
#
#   tools/quality/abq_parity.sh [BUILD_DIR] [SHARED_DIR] > table.md
#
# Settings: calibrate on sotu-calib.txt, 32 x 512 (as cuda_model_test's AbqInference*); evaluate
# sotu-eval.txt, L = 512, first MAXWIN windows (default 32); seed 0; fp32 compute.
# Environment: DEVICE (cpu or cuda; default cpu, where `--kernels abq` runs the kernels' scalar
# reference: about 7 minutes an evaluation on 2 cores), THREADS (2), MAXWIN (32), QCAL (default
# BUILD_DIR/bin/qcal), WORK (default a temporary directory, removed at exit). The markdown table
# goes to stdout, progress to stderr; the exit status is 1 when a run failed or the paths differ.
set -euo pipefail
BUILD=${1:-build}
SHARED=${2:-../shared}
# shellcheck source=tools/quality/lib.sh
source "$(dirname "$0")/lib.sh"
quality_setup
MAXWIN=${MAXWIN:-32}
MODEL="$SHARED/models/sotu-llama-16m"

kernels=(b1)
[[ $DEVICE == cuda* ]] && kernels=(b1 int8)

# evaluate DIR NAME [EVAL FLAGS...] -> E (the --json output file), progress on stderr
evaluate() {
  local dir=$1 name=$2
  shift 2
  E="$dir.$name.json"
  local start=$SECONDS
  if ! "$QCAL" eval --model "$dir" --text "$SHARED/data/sotu-eval.txt" --seq-len 512 \
    --max-windows "$MAXWIN" --device "$DEVICE" --threads "$THREADS" --json "$@" \
    >"$E" 2>"$dir.$name.log"; then
    echo "  $name: FAILED; error:" >&2
    sed 's/^/    /' "$dir.$name.log" >&2
    FAILED=1
    E=""
    return
  fi
  echo "  $name: $(num perplexity "$E") ($((SECONDS - start)) s)" >&2
}

echo "| Setting | dequant | $(printf 'abq %s | ' "${kernels[@]}")relative difference | same NLL |"
echo "|---|---|$(printf -- '---|%.0s' "${kernels[@]}")---|---|"
for cfg in "W4A8 g128:4:uniform:128" "W2*A8 g64:2:balanced:64"; do
  IFS=: read -r label bits grid group <<<"$cfg"
  echo "$label:" >&2
  dir="$WORK/w${bits}${grid}g${group}"
  printf 'method: gptq\nweights: {bits: %s, grid: %s, group_size: %s}\nactivations: {bits: 8}\n' \
    "$bits" "$grid" "$group" >"$dir.yaml"
  if ! "$QCAL" quantize --model "$MODEL" --recipe "$dir.yaml" --calib "$SHARED/data/sotu-calib.txt" \
    --samples 32 --seq-len 512 --out "$dir" --overwrite --device "$DEVICE" --threads "$THREADS" \
    >"$dir.log" 2>&1; then
    echo "  quantize: FAILED; error:" >&2
    sed 's/^/    /' "$dir.log" >&2
    FAILED=1
    echo "| $label | failed |"
    continue
  fi
  evaluate "$dir" dequant --kernels dequant
  deq=$E
  row="| $label | $([[ -n $deq ]] && printf '%.6f' "$(num perplexity "$deq")" || echo failed) |"
  worst=0 same=yes
  for k in "${kernels[@]}"; do
    evaluate "$dir" "abq-$k" --kernels abq --abq-kernel "$k"
    if [[ -z $E || -z $deq ]]; then
      row+=" failed |"
      same=no
      continue
    fi
    row+=" $(printf '%.6f' "$(num perplexity "$E")") |"
    d=$(awk -v a="$(num perplexity "$E")" -v b="$(num perplexity "$deq")" \
      'BEGIN { d = (a - b) / b; if (d < 0) d = -d; printf "%.2g", d }')
    worst=$(awk -v a="$d" -v b="$worst" 'BEGIN { print (a > b) ? a : b }')
    [[ $(num nll "$E") == "$(num nll "$deq")" ]] || same=no
  done
  [[ $same == yes ]] || FAILED=1
  echo "$row $worst | $same |"
done
exit "$FAILED"
