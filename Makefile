# Thin wrapper over CMake. The two commands of the README:
#   make demo   builds what it needs and runs disco-bench on the best backend
#   make test   installs what is missing (as root), builds, runs every test
# Build directories: build/ (normal, -Werror), build-asan/, build-tsan/,
# build-fuzz/ (clang + libFuzzer).

JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
BUILD_TYPE ?= RelWithDebInfo

.PHONY: all build deps deps-build demo test test-unit test-asan test-tsan test-fuzz format format-check clean

all: build

deps:
	@bash scripts/install-deps.sh test

deps-build:
	@bash scripts/install-deps.sh build

build:
	cmake -S . -B build -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) -DDISCO_WERROR=ON $(CMAKE_FLAGS)
	cmake --build build -j $(JOBS)

demo: deps-build build
	@bash scripts/demo.sh build

# The whole suite: normal build (with the CUDA sources compiled when nvcc is
# there), ASan+UBSan build of the CPU tests, TSan run of the local backend,
# and a bounded libFuzzer run.
test: deps format-check test-unit test-asan test-tsan test-fuzz
	@echo "make test: all suites passed"

test-unit: build
	cd build && ctest -j $(JOBS) --output-on-failure --timeout 600

test-asan:
	cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DDISCO_WERROR=ON \
	  -DDISCO_SANITIZE=address,undefined -DDISCO_WITH_NCCL=OFF $(CMAKE_FLAGS)
	cmake --build build-asan -j $(JOBS)
	cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  ctest -j $(JOBS) --output-on-failure --timeout 900 -LE "slow|python"

test-tsan:
	cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDISCO_WERROR=ON \
	  -DDISCO_SANITIZE=thread -DDISCO_WITH_NCCL=OFF -DDISCO_WITH_MPI=OFF $(CMAKE_FLAGS)
	cmake --build build-tsan -j $(JOBS)
	cd build-tsan && TSAN_OPTIONS=halt_on_error=1 \
	  ctest -j $(JOBS) --output-on-failure --timeout 900 -LE "slow|python|gpu"

FUZZ_SECONDS ?= 60
test-fuzz:
	@bash tests/fuzz/run.sh $(FUZZ_SECONDS)

format:
	clang-format -i $$(git ls-files '*.c' '*.h' '*.cu' '*.cuh')

# Fails when a tracked C/CUDA file differs from .clang-format (skipped when
# clang-format is not installed).
format-check:
	@if command -v clang-format >/dev/null 2>&1; then \
	  clang-format --dry-run --Werror $$(git ls-files '*.c' '*.h' '*.cu' '*.cuh') && \
	  echo "format-check: ok"; \
	else echo "format-check: clang-format not installed, skipped"; fi

clean:
	rm -rf build build-asan build-tsan build-fuzz
