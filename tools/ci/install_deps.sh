#!/usr/bin/env bash
# Installs the Debian bookworm packages qcal needs to build and test, when any is missing.
# Nothing is downloaded from anywhere but Debian's archive (and, for the Node.js interop test,
# the npm registry through `npm ci` with a committed lockfile, done by the Node.js tests themselves).
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config git ca-certificates
  libabsl-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  librocksdb-dev
  prometheus-cpp-dev libmicrohttpd-dev
  libopenblas-dev liblapacke-dev
  libsentencepiece-dev sentencepiece
  libpcre2-dev libutf8proc-dev
  libyaml-cpp-dev nlohmann-json3-dev libcli11-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libspdlog-dev
  libssl-dev
  clang libclang-rt-14-dev lld
  prometheus openssl
  python3
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

# The Node.js tests (tests/service/node: the gRPC client; tests/common/node: the tokenizer
# cross-check): Debian's nodejs and npm, unless a node with npm is already installed some other
# way.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  missing+=(nodejs npm)
fi

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "install_deps: installing ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
