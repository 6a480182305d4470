# Thin wrapper over CMake. `make demo` and `make test` do all set-up on a fresh Debian bookworm machine.
BUILD ?= build
BUILD_TYPE ?= Release
JOBS ?= $(shell nproc)
CMAKE_ARGS ?=

.PHONY: all deps configure build test expectations test-cpu demo format clean

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

demo: build
	@bash tools/demo.sh $(BUILD)

format:
	@find common kernels services tools tests -name '*.h' -o -name '*.cc' -o -name '*.cu' -o -name '*.cuh' \
	  | xargs clang-format -i

clean:
	@rm -rf $(BUILD)
