# shellcheck shell=bash
# Shared by the tools/quality/*_quality.sh scripts (sourced, not run): the common environment, the
# cached `qcal quantize` run, and the readers of its results.
#
# quality_setup (after the script has set BUILD and SHARED) sets QCAL (default BUILD/bin/qcal),
# THREADS (2), DEVICE (cpu), MODELS ("stories260k sotu-llama-16m"), WORK (a given directory is kept,
# so an interrupted run resumes from its cache; default a temporary one, removed at exit) and
# FAILED=0.

quality_setup() {
  QCAL=${QCAL:-"$BUILD/bin/qcal"}
  THREADS=${THREADS:-2}
  DEVICE=${DEVICE:-cpu}
  MODELS=${MODELS:-"stories260k sotu-llama-16m"}
  if [[ -n "${WORK:-}" ]]; then
    mkdir -p "$WORK"
  else
    WORK=$(mktemp -d)
    # shellcheck disable=SC2064  # expand WORK now
    trap "rm -rf '$WORK'" EXIT
  fi
  mkdir -p "$WORK/cache"
  # shellcheck disable=SC2034  # read by the sourcing script
  FAILED=0
}

num() {  # num KEY FILE -> the first number after "KEY": in FILE
  grep -o "\"$1\": *[0-9.eE+-]*" "$2" | head -n 1 | sed 's/.*: *//'
}

device_kind() {  # device_kind ENTRY -> the run's device kind (qcal_run.json), or "-"
  if [[ -n $1 ]]; then
    grep -o '"device_kind": *"[^"]*"' "$1.run.json" | head -n 1 | sed 's/.*: *"//; s/"$//'
  else
    echo -
  fi
}

ppl() {  # ppl ENTRY -> perplexity with 4 decimals, or "failed"
  if [[ -n $1 ]]; then printf '%.4f' "$(num perplexity "$1.json")"; else echo failed; fi
}

# quantize_cached LABEL RECIPE MODEL_DIR CALIB SAMPLES LEN EVAL EVAL_LEN MAXWIN
# Runs `qcal quantize` of RECIPE (the recipe's text) once per distinct (model, data, device,
# threads, recipe) and sets R to its cache entry: R.yaml the recipe, R.json the --json output,
# R.run.json and R.report.json the run's qcal_run.json and qcal_report.json, R.secs its wall
# seconds. On failure R="" and FAILED=1 (the error goes to stderr and stays in R.log). MAXWIN <= 0
# evaluates every window. Progress (LABEL and the perplexity) goes to stderr.
quantize_cached() {
  local label=$1 recipe=$2 model=$3 calib=$4 samples=$5 len=$6 eval=$7 elen=$8 maxwin=$9
  local key
  key=$(printf '%s\n%s %s %s %s %s %s %s %s\n%s\n' "$(basename "$model")" "$calib" "$samples" "$len" \
    "$eval" "$elen" "$maxwin" "$DEVICE" "$THREADS" "$recipe" | sha1sum | cut -c1-16)
  R="$WORK/cache/$key"
  if [[ -s "$R.json" ]]; then
    echo "  $label: $(num perplexity "$R.json") (cached)" >&2
    return
  fi
  printf '%s\n' "$recipe" >"$R.yaml"
  local windows=()
  ((maxwin > 0)) && windows=(--eval-max-windows "$maxwin")
  local start=$SECONDS
  if "$QCAL" quantize --model "$model" --recipe "$R.yaml" --calib "$calib" --samples "$samples" \
    --seq-len "$len" --eval-text "$eval" --eval-seq-len "$elen" "${windows[@]}" \
    --out "$WORK/out" --overwrite --threads "$THREADS" --device "$DEVICE" --json \
    >"$R.tmp" 2>"$R.log"; then
    cp "$WORK/out/qcal_run.json" "$R.run.json"
    cp "$WORK/out/qcal_report.json" "$R.report.json"
    echo $((SECONDS - start)) >"$R.secs"
    mv "$R.tmp" "$R.json"
    echo "  $label: $(num perplexity "$R.json") ($((SECONDS - start)) s)" >&2
  else
    echo "  $label: FAILED ($((SECONDS - start)) s); recipe $R.yaml; error:" >&2
    sed 's/^/    /' "$R.log" >&2
    rm -f "$R.tmp"
    R=""
    # shellcheck disable=SC2034  # read by the sourcing script
    FAILED=1
  fi
}
