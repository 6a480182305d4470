#!/usr/bin/env bash
# An A/B comparison of two qcal builds' ABQ layers in one device call: the bundle's qcal (made by
# tools/gpu/pack.sh, the build under test) against a base qcal staged beside it, on the same card.
#
# Here (before the call), keep the base build's binary, then pack the new build:
#   tools/gpu/ab.sh --stage build-cuda/bin/qcal      (strips and xz's it to .devpack/base/qcal_base.xz)
#   ... change, rebuild ...
#   QCAL_PACK_BINARIES="qcal cuda_abq_test" tools/gpu/pack.sh
# On the device (carry [".devpack"]):
#   bash tools/gpu/ab.sh
# which runs, logging under $OUT (or ./out):
#   1. cuda_abq_test (the new build; all of it, or QCAL_AB_FILTER) and compute-sanitizer memcheck on
#      its *Dp4a* test;
#   2. `qcal bench --abq --abq-timing sequence --abq-tokens M` (QCAL_AB_TOKENS, default 1) on the
#      shapes QCAL_AB_SHAPES (default: the bench's four), base and new interleaved QCAL_AB_RUNS times
#      (default 2), so that drift on the card shows in both;
#   3. a table of the rows whose kernel matches QCAL_AB_KERNEL (default dp4a): µs of every run, base
#      then new, and new's mean over base's.
# QCAL_AB_EXTRA names more builds staged beside the base (`--stage BIN NAME` keeps BIN as
# .devpack/base/qcal_NAME.xz), run in the same interleaving and tabled after new.
# Each run's output is kept (ab_base_N.txt, ab_new_N.txt, ab_NAME_N.txt). Exit status: 1 when a
# test or memcheck failed, else 0.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)

if [[ ${1:-} == --stage ]]; then
  [[ -x ${2:-} ]] || { echo "ab.sh --stage: no executable '${2:-}'" >&2; exit 2; }
  name=${3:-base}
  [[ $name =~ ^[A-Za-z0-9_]+$ ]] || { echo "ab.sh --stage: bad name '$name'" >&2; exit 2; }
  mkdir -p "$root/.devpack/base"
  strip -o "$root/.devpack/base/qcal_$name" "$2"
  xz -T2 -6 -f "$root/.devpack/base/qcal_$name"
  ls -l "$root/.devpack/base/qcal_$name.xz"
  exit 0
fi

pack=$root/.devpack/pack.tar.xz
base=$root/.devpack/base/qcal_base.xz
[[ -f $pack ]] || { echo "ab.sh: no $pack (tools/gpu/pack.sh makes it)" >&2; exit 2; }
[[ -f $base ]] || { echo "ab.sh: no $base (tools/gpu/ab.sh --stage BUILD/bin/qcal makes it)" >&2; exit 2; }
out=${OUT:-$root/out}
mkdir -p "$out"
exec > >(tee "$out/ab.txt") 2>&1
p=$(mktemp -d /tmp/qcal-ab.XXXXXX)
trap 'rm -rf "$p"' EXIT
xz -dc "$pack" | tar xf - -C "$p"
xz -dc "$base" >"$p/bin/qcal_base"
chmod +x "$p/bin/qcal_base"
read -r -a extra <<<"${QCAL_AB_EXTRA:-}"
for name in "${extra[@]}"; do
  f=$root/.devpack/base/qcal_$name.xz
  [[ -f $f ]] || { echo "ab.sh: no $f (tools/gpu/ab.sh --stage BIN $name makes it)" >&2; exit 2; }
  xz -dc "$f" >"$p/bin/qcal_$name"
  chmod +x "$p/bin/qcal_$name"
done
export QCAL_SHARED_DIR=$p/data/shared LD_LIBRARY_PATH=$p/lib:/usr/local/cuda/lib64
nvidia-smi --query-gpu=name --format=csv,noheader
status=0
t0=$SECONDS

if [[ -x $p/bin/cuda_abq_test ]]; then
  echo "== cuda_abq_test ${QCAL_AB_FILTER:-}"
  timeout 200 "$p/bin/cuda_abq_test" --gtest_color=no ${QCAL_AB_FILTER:+--gtest_filter=$QCAL_AB_FILTER} \
    >"$out/abq_test.log" 2>&1 || status=1
  grep -E "^\[  (FAILED|PASSED) |Failure" "$out/abq_test.log" | head -6
  echo "== memcheck *Dp4a* (elapsed $((SECONDS - t0)) s)"
  timeout 150 /usr/local/cuda/bin/compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$p/bin/cuda_abq_test" --gtest_color=no --gtest_filter='*Dp4a*' >"$out/memcheck.log" 2>&1 ||
    status=1
  grep -E "ERROR SUMMARY" "$out/memcheck.log" | head -1
else
  echo "== no cuda_abq_test in the bundle: no tests"
fi

shapes=()
[[ -n ${QCAL_AB_SHAPES:-} ]] && shapes=(--abq-shapes "$QCAL_AB_SHAPES")
runs=${QCAL_AB_RUNS:-2}
for ((r = 1; r <= runs; ++r)); do
  for side in base new "${extra[@]}"; do
    bin=$p/bin/qcal
    [[ $side != new ]] && bin=$p/bin/qcal_$side
    echo "== $side run $r (elapsed $((SECONDS - t0)) s)"
    timeout 200 "$bin" bench --abq --abq-timing sequence --abq-tokens "${QCAL_AB_TOKENS:-1}" \
      "${shapes[@]}" >"$out/ab_${side}_$r.txt" 2>&1 || echo "   (rc $?)"
  done
done

# Rows: "d_out x d_in  m  config  kernel  us ...": the table keyed by shape and config.
python3 - "$out" "$runs" "${QCAL_AB_KERNEL:-dp4a}" "${extra[@]}" <<'PY'
import re, sys
out, runs, kernel = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sides = ["base", "new"] + sys.argv[4:]
row = re.compile(r"^(\d+ x \d+)\s+(\d+)\s+(\S+)\s+(\S+)\s+([0-9.]+)")
table = {}
for side in sides:
    for r in range(1, runs + 1):
        try:
            lines = open(f"{out}/ab_{side}_{r}.txt").read().splitlines()
        except OSError:
            continue
        for line in lines:
            m = row.match(line.strip())
            if m and m.group(4) == kernel:
                key = (m.group(1), m.group(2), m.group(3))
                table.setdefault(key, {s: [] for s in sides})[side].append(float(m.group(5)))
mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
print(f"{'shape':>14} {'m':>3} {'config':>7}  " + " / ".join(f"{s} µs" for s in sides) + "  " +
      " ".join(f"{s}/base" for s in sides[1:]))
for key, v in table.items():
    cells = " / ".join(" ".join(f"{x:.2f}" for x in v[s]) for s in sides)
    ratios = " ".join(f"{mean(v[s]) / mean(v['base']):.3f}" for s in sides[1:])
    print(f"{key[0]:>14} {key[1]:>3} {key[2]:>7}  {cells}  {ratios}")
PY
echo "== done (elapsed $((SECONDS - t0)) s), status $status"
exit $status
