# Thin wrapper over CMake. `make demo` and `make test` do all set-up on a fresh Debian bookworm machine.
BUILD ?= build
BUILD_TYPE ?= Release
JOBS ?= $(shell nproc)
CMAKE_ARGS ?=

.PHONY: all deps configure build test expectations test-cpu demo format clean fuzz-configure fuzz \
  sanitize sanitize-build

all: build

deps:
	@bash tools/ci/install_deps.sh

configure: deps
	@cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) $(CMAKE_ARGS) >/dev/null

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

test: build
	@ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS) --timeout 900 -LE expectation

# Tests of published expectations that our measurements contradict (docs/QUALITY.md explains each).
expectations: build
	@ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS) --timeout 900 -L expectation

# The fuzz build (docs/OPERATIONS.md, "Fuzzing"): clang, ASan + UBSan, libFuzzer, no CUDA, in its
# own directory. `make sanitize` runs the fast unit tests under the sanitizers; `make fuzz` runs
# every harness for FUZZ_SECONDS seconds (each), or, with FUZZ_RUNS=N, N inputs each from the fixed
# seed FUZZ_SEED (reproducible: what CI runs).
FUZZ_BUILD ?= build-fuzz
FUZZ_SECONDS ?= 60
FUZZ_RUNS ?=
FUZZ_SEED ?= 1
FUZZ_CMAKE_ARGS ?=

fuzz-configure: deps
	@cmake -S . -B $(FUZZ_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_C_COMPILER=clang \
	  -DCMAKE_CXX_COMPILER=clang++ -DQCAL_FUZZ=ON -DQCAL_CUDA=OFF $(FUZZ_CMAKE_ARGS) >/dev/null

# Builds what `make sanitize` and `make fuzz` run, without running it.
sanitize-build: fuzz-configure
	@cmake --build $(FUZZ_BUILD) -j $(JOBS) --target sanitize_targets

sanitize: fuzz-configure
	@cmake --build $(FUZZ_BUILD) -j $(JOBS) --target check_sanitize

fuzz: fuzz-configure
	@FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_RUNS=$(FUZZ_RUNS) FUZZ_SEED=$(FUZZ_SEED) cmake --build $(FUZZ_BUILD) -j $(JOBS) --target run_fuzzers

demo: build
	@bash tools/demo.sh $(BUILD)

format:
	@find common kernels services tools tests -name '*.h' -o -name '*.cc' -o -name '*.cu' -o -name '*.cuh' \
	  | xargs clang-format -i

clean:
	@rm -rf $(BUILD) $(FUZZ_BUILD)
