#!/usr/bin/env bash
# Build llama.cpp's own `llama-export-lora` for tests/runtimes/test_llama_cpp.py, from the llama.cpp
# source that the llama-cpp-python sdist carries (vendor/llama.cpp), and install it into a cache:
#   ~/.cache/loratool-tests/llama.cpp-$VERSION/bin/llama-export-lora
# When that binary already exists this does nothing. A failed download or build prints one line to
# stderr and exits 0 (the test then skips, saying why), so .ci/run goes on.
#
# Only the one target is built (static libraries, CPU backend only, no native -march, no curl, no
# tests/examples/server).
# Measured 2026-12-07 on the 2-core CI machine, shared (load average about 3.5), under nice -n 5:
# download + configure + build of the 132 ninja steps took 8 min 48 s wall clock (429 s user CPU).
# Later runs find the cached binary and take no time.
set -uo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PREFIX="${LORATOOL_LLAMA_CPP_DIR:-$HOME/.cache/loratool-tests/llama.cpp-$VERSION}"
BIN="$PREFIX/bin/llama-export-lora"
JOBS="${LLAMA_CPP_BUILD_JOBS:-2}"

if [ -x "$BIN" ]; then
  exit 0
fi

fail() {
  echo "llama.cpp (llama-cpp-python==$VERSION sdist) not built: $1; tests/runtimes/test_llama_cpp.py will skip" >&2
  rm -rf "$work"
  exit 0
}

work=$(mktemp -d)
if ! python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" >/dev/null 2>&1; then
  fail "pip download failed"
fi
sdist=$(ls "$work"/llama_cpp_python-*.tar.gz 2>/dev/null | head -n 1)
[ -n "$sdist" ] || fail "no sdist in the download"
tar -xzf "$sdist" -C "$work" || fail "could not extract $sdist"
src=$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | head -n 1)
[ -n "$src" ] && [ -f "$src/CMakeLists.txt" ] || fail "no vendor/llama.cpp in the sdist"

generator=()
if command -v ninja >/dev/null 2>&1; then
  generator=(-G Ninja)
fi
if ! cmake -S "$src" -B "$work/build" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_HIP=OFF -DGGML_SYCL=OFF \
    -DGGML_OPENCL=OFF -DGGML_BACKEND_DL=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON \
    >"$work/configure.log" 2>&1; then
  fail "cmake configure failed (tail: $(tail -n 1 "$work/configure.log"))"
fi
if ! cmake --build "$work/build" --target llama-export-lora -j "$JOBS" >"$work/build.log" 2>&1; then
  fail "cmake build failed (tail: $(tail -n 1 "$work/build.log"))"
fi
built=$(find "$work/build" -type f -name llama-export-lora -perm -u+x | head -n 1)
[ -n "$built" ] || fail "the build produced no llama-export-lora"
mkdir -p "$PREFIX/bin"
cp "$built" "$BIN.tmp" && mv "$BIN.tmp" "$BIN" || fail "could not install into $PREFIX/bin"
rm -rf "$work"
