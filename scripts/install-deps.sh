#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks for building (and, with "test",
# testing) disco. Only acts as root; otherwise it reports what is missing.
# A failed install (no network, say) is reported, not fatal: the build then
# skips the optional parts whose dependencies are absent (MPI backend, fuzz
# target, Python tests), and the test targets fail loudly where they need them.
# usage: scripts/install-deps.sh [build|test]   (default: test)
set -uo pipefail
mode=${1:-test}

missing_apt=()
command -v cmake >/dev/null 2>&1 || missing_apt+=(cmake)
command -v gcc >/dev/null 2>&1 || missing_apt+=(gcc)
command -v make >/dev/null 2>&1 || missing_apt+=(make)
command -v mpicc >/dev/null 2>&1 || missing_apt+=(libopenmpi-dev openmpi-bin)
if [ "$mode" = test ]; then
  command -v clang >/dev/null 2>&1 || missing_apt+=(clang)
  command -v clang-format >/dev/null 2>&1 || missing_apt+=(clang-format)
  # libFuzzer and the sanitizer runtimes for clang
  ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1 ||
    missing_apt+=(libclang-rt-dev)
  command -v python3 >/dev/null 2>&1 || missing_apt+=(python3 python3-pip)
fi

if [ ${#missing_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "install-deps: apt-get install ${missing_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing_apt[@]}" \
      >/dev/null; } || echo "install-deps: apt-get failed; going on without: ${missing_apt[*]}" >&2
  else
    echo "install-deps: missing (run as root to install): ${missing_apt[*]}" >&2
  fi
fi

# Python side: numpy and pytest from PyPI (see docs/dependencies.md).
if [ "$mode" = test ] && ! python3 -c 'import numpy, pytest' >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] || [ -n "${VIRTUAL_ENV:-}" ]; then
    python3 -m pip install -q --disable-pip-version-check -r python/requirements-test.txt ||
      echo "install-deps: pip install failed; Python tests will be skipped" >&2
  else
    echo "install-deps: numpy/pytest missing: pip install -r python/requirements-test.txt" >&2
  fi
fi
exit 0
