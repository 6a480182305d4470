#!/usr/bin/env bash
# An A/B comparison of qcal builds' quantization jobs (`qcal bench`) in one device call: the
# bundle's qcal (tools/gpu/pack.sh, the build under test: "new") against builds staged beside it
# by `tools/gpu/ab.sh --stage BIN NAME` (.devpack/base/qcal_NAME.xz), on the same card. What
# ab.sh is for the ABQ layers, this is for the 7B / 70B job's stages.
#
# On the device (carry [".devpack"]):
#   QCAL_AB_BUILDS="new base" bash tools/gpu/bench_ab.sh
# env: QCAL_AB_BUILDS   builds, in the order each round runs them (default: "new base")
#      QCAL_AB_JOBS     jobs, any of gptq er aser gptq70b (default: "gptq"); gptq70b is
#                       `--shape 70b` (3 blocks, extrapolated), the others the 7B shape: GPTQ W4
#                       g128, + error_reconstruction rank 64, ASER W4A8 rank 64
#      QCAL_AB_RUNS     rounds (default 2): every build runs every job once a round, interleaved,
#                       so that drift on the card shows in all of them
#      QCAL_AB_LIMIT    seconds for the whole script (default 560): no run starts after it
# Output: one short line a run (whole model, stages, the solver's split, the first block's and
# the last two blocks' seconds, the mean relative output error), then the median a build and job. The device tool returns only the last 12,000
# characters and 8 files, so the lines are short and the full outputs stay under $OUT.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
pack=$root/.devpack/pack.tar.xz
[[ -f $pack ]] || { echo "bench_ab.sh: no $pack (tools/gpu/pack.sh makes it)" >&2; exit 2; }
out=${OUT:-$root/out}
mkdir -p "$out"
p=$(mktemp -d /tmp/qcal-bench-ab.XXXXXX)
trap 'rm -rf "$p"' EXIT
xz -dc "$pack" | tar xf - -C "$p"
read -r -a builds <<<"${QCAL_AB_BUILDS:-new base}"
for name in "${builds[@]}"; do
  [[ $name == new ]] && continue
  f=$root/.devpack/base/qcal_$name.xz
  [[ -f $f ]] || { echo "bench_ab.sh: no $f (tools/gpu/ab.sh --stage BIN $name)" >&2; exit 2; }
  xz -dc "$f" >"$p/bin/qcal_$name" && chmod +x "$p/bin/qcal_$name"
done
export QCAL_SHARED_DIR=$p/data/shared LD_LIBRARY_PATH=$p/lib:/usr/local/cuda/lib64
read -r -a jobs <<<"${QCAL_AB_JOBS:-gptq}"
runs=${QCAL_AB_RUNS:-2}
limit=${QCAL_AB_LIMIT:-560}
printf 'method: gptq\nweights: {bits: 4, group_size: 128}\nerror_reconstruction: {rank: 64}\n' \
  >"$out/er.yaml"
printf '%s\n' 'method: gptq' 'weights: {bits: 4, group_size: -1}' 'activations: {bits: 8}' \
  'smoothing: {method: aser, outlier_channels: 32}' 'error_reconstruction: {rank: 64}' \
  >"$out/aser.yaml"
nvidia-smi --query-gpu=name --format=csv,noheader

# The summary line of one bench output: whole-model seconds first (the medians sort on it).
summarize() {
  awk '
    /^whole model:/ { whole = $3 }
    /^  (smoothing|forward|hessians|solves) / { stages = stages sprintf("%s %s ", substr($1, 1, 4), $2) }
    /^    factorizations/ {
      gsub(/ s,/, ","); gsub(/factorizations/, "fac"); gsub(/column loops and updates/, "loops")
      gsub(/output errors/, "oe"); gsub(/transfers/, "tr"); gsub(/error reconstruction/, "er")
      sub(/^ +/, ""); split_ = $0
    }
    /^per block:/ && NF > 4 { per = "| first " $3 ", blocks " $(NF - 2) " " $(NF - 1) " s" }
    /^mean relative output error [0-9]/ { err = "| err " $5 }
    END { printf "%s s | %s| %s %s %s\n", whole, stages, split_, per, err }
  ' "$1"
}

declare -A lines
for ((r = 1; r <= runs; ++r)); do
  for job in "${jobs[@]}"; do
    for name in "${builds[@]}"; do
      if ((SECONDS > limit)); then
        echo "bench_ab.sh: ${limit} s reached; later runs skipped"
        break 3
      fi
      bin=$p/bin/qcal
      [[ $name != new ]] && bin=$p/bin/qcal_$name
      args=(bench --shape 7b --compute-dtype bf16)
      case $job in
        gptq) ;;
        er) args+=(--recipe "$out/er.yaml") ;;
        aser) args+=(--recipe "$out/aser.yaml") ;;
        gptq70b) args=(bench --shape 70b --compute-dtype bf16 --blocks 3) ;;
        *) echo "bench_ab.sh: unknown job '$job'" >&2; exit 2 ;;
      esac
      log=$out/bench_${job}_${name}_$r.txt
      timeout 240 "$bin" "${args[@]}" >"$log" 2>&1
      rc=$?
      line=$(summarize "$log")
      echo "$job $name #$r rc=$rc: $line"
      ((rc == 0)) && lines[$job/$name]+="$line"$'\n'
    done
  done
done

echo "== medians (whole model, s)"
for job in "${jobs[@]}"; do
  for name in "${builds[@]}"; do
    v=$(printf '%s' "${lines[$job/$name]:-}" | awk 'NF { print $1 }' | sort -g |
      awk '{ a[NR] = $1 } END { if (NR) print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2), "of", NR }')
    echo "$job $name: ${v:-no run}"
  done
done
