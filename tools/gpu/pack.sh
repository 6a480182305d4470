#!/usr/bin/env bash
# Builds what a GPU session needs (the qcal CLI and the GPU test binaries, CUDA on, no service:
# only engine, kernels and common) and bundles stripped copies with the shared models and texts
# through ../shared/tools/device-pack, recompressed with xz into .devpack/pack.tar.xz (the gzip
# bundle of every binary, about 90 MB, does not fit a device call's 64 MiB; xz -6 makes binaries
# about 30% smaller than gzip: 4 binaries and the data, 63 → 45 MB). A device call then carries
# [".devpack"] and runs tools/gpu/session.sh, which unpacks either form.
#
#   usage: tools/gpu/pack.sh [BUILD_DIR]     (default: build-cuda; JOBS=2 parallel compiles)
#   env:   QCAL_SHARED_DIR (default: ../shared beside the checkout); QCAL_PACK_BINARIES (a subset);
#          QCAL_PACK_XZ=0 keeps device-pack's gzip bundle (.devpack/pack.tar.gz)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-build-cuda}
[[ $build = /* ]] || build=$root/$build
shared=${QCAL_SHARED_DIR:-$root/../shared}
jobs=${JOBS:-2}
binaries=(qcal cuda_ops_test cuda_backward_test cuda_quant_test cuda_low_rank_test cuda_abq_test
  cuda_model_test cuda_engine_test gang_pipeline_test cuda_train_test
  retrain_cuda_block_trainer_test)
# QCAL_PACK_BINARIES (space-separated) bundles fewer, when the whole set would pass the size budget;
# session.sh notes the tests whose binary is not in the bundle.
if [[ -n ${QCAL_PACK_BINARIES:-} ]]; then read -r -a binaries <<<"$QCAL_PACK_BINARIES"; fi
# The bundle and the working tree (tracked and untracked, not ignored) travel together under a
# 64 MiB limit; 1 MiB is left spare.
tree_bytes=$(cd "$root" && git ls-files -z --cached --others --exclude-standard |
  xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
max_bytes=$(((63 << 20) - ${tree_bytes:-0}))

[[ -x $shared/tools/device-pack ]] || { echo "pack.sh: no device-pack under $shared/tools" >&2; exit 1; }
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQCAL_CUDA=ON \
  -DQCAL_SERVICE=OFF >/dev/null
cmake --build "$build" --target "${binaries[@]}" -j "$jobs"

# Only what the session reads, laid out like ../shared (QCAL_SHARED_DIR points there on the GPU).
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/shared/models" "$stage/shared/data" "$stage/bin"
ln -s "$shared/models/stories260k" "$shared/models/sotu-llama-16m" "$stage/shared/models/"
for text in tinystories-eval tinystories-calib sotu-eval sotu-calib; do
  ln -s "$shared/data/$text.txt" "$stage/shared/data/"
done
paths=()
for b in "${binaries[@]}"; do
  src=$build/bin/$b
  [[ -x $src ]] || src=$build/tests/$b
  strip -o "$stage/bin/$b" "$src"
  paths+=("$stage/bin/$b")
done

# The CUPTI timeline (session.sh step gaps) and the libcupti it was linked with, where built.
if cmake --build "$build" --target qcal_cupti_trace -j "$jobs" >/dev/null 2>&1 &&
  [[ -f $build/bin/libqcal_cupti_trace.so ]]; then
  strip -o "$stage/bin/libqcal_cupti_trace.so" "$build/bin/libqcal_cupti_trace.so"
  cupti=$(ldd "$build/bin/libqcal_cupti_trace.so" | awk '/libcupti/ {print $3}')
  paths+=("$stage/bin/libqcal_cupti_trace.so")
  [[ -n $cupti ]] && paths+=("$cupti")
fi

rm -f "$root/.devpack/pack.tar.gz" "$root/.devpack/pack.tar.xz"
"$shared/tools/device-pack" "$root/.devpack" "${paths[@]}" --data "$stage/shared"
bundle=$root/.devpack/pack.tar.gz
if [[ ${QCAL_PACK_XZ:-1} != 0 ]]; then
  command -v xz >/dev/null || { echo "pack.sh: xz not found (apt-get install xz-utils)" >&2; exit 1; }
  gzip -dc "$bundle" | xz -6 -T0 >"$root/.devpack/pack.tar.xz"
  rm "$bundle"
  bundle=$root/.devpack/pack.tar.xz
fi
size=$(stat -c %s "$bundle")
if ((size > max_bytes)); then
  echo "pack.sh: bundle is $size bytes, over the $max_bytes-byte budget" >&2
  exit 1
fi
echo "pack.sh: $bundle, $((size >> 20)) MiB"
