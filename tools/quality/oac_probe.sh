#!/usr/bin/env bash
# Builds and runs oac_probe (tools/quality/oac_probe/oac_probe.cc): why output-adaptive calibration
# loses to GPTQ at 2 bits on stories260k W2 g32 (docs/QUALITY.md, OAC section). Subcommands:
# objective (each method's tr(ΔW·H_oac·ΔWᵀ) per linear; the quick part), all (objective, then the
# FP model with one linear or one block replaced by each method's), curvature (the calibration
# loss along five linears' 2-bit error against ΔᵀH_oacΔ).
#
#   tools/quality/oac_probe.sh [SUBCOMMAND] [BUILD_DIR] [SHARED_DIR] [--bits N] [--group N]
#                              [--damp X]
#
# SUBCOMMAND defaults to all, BUILD_DIR to build (an already configured build tree), SHARED_DIR to
# $QCAL_SHARED_DIR, else ../shared. The tables go to stdout; progress to stderr.
# Environment: JOBS (build parallelism, default 2).
set -euo pipefail
CMD=${1:-all}
BUILD=${2:-build}
SHARED=${3:-${QCAL_SHARED_DIR:-../shared}}
shift $(($# < 3 ? $# : 3))
cmake --build "$BUILD" -j "${JOBS:-2}" --target oac_probe >&2
exec "$BUILD/bin/oac_probe" "$CMD" "$@" "$SHARED"
