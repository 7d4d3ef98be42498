#!/usr/bin/env bash
# Build llama.cpp's own reference quantizers (ggml-quants.c, quantize_row_<type>_ref) into a small
# program, tests/runtimes/ggml_quantize_ref.c, for tests/quant/test_gguf_quants.py, from the llama.cpp
# source of the same llama-cpp-python sdist as build_llama_cpp.sh, and install it into its cache:
#   ~/.cache/loratool-tests/llama.cpp-$VERSION/bin/ggml-quantize-ref
# When that binary exists this does nothing. A failed download or build prints one line to stderr and
# exits 0 (the tests then skip, saying why).
#
# Two files are compiled (about 15 s): ggml-quants.c and the driver, -O2 without -march (so no fused
# multiply-adds, as build_llama_cpp.sh's GGML_NATIVE=OFF build) and with -ffp-contract=off, so the
# program computes what the C source says in plain float32 on any compiler.
set -uo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PREFIX="${LORATOOL_LLAMA_CPP_DIR:-$HOME/.cache/loratool-tests/llama.cpp-$VERSION}"
BIN="$PREFIX/bin/ggml-quantize-ref"
HERE="$(cd "$(dirname "$0")" && pwd)"
CC="${CC:-cc}"

if [ -x "$BIN" ]; then
  exit 0
fi

work=$(mktemp -d)
fail() {
  echo "ggml-quantize-ref (llama-cpp-python==$VERSION sdist) not built: $1; tests/quant/test_gguf_quants.py's llama.cpp checks will skip" >&2
  rm -rf "$work"
  exit 0
}

if ! python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" >/dev/null 2>&1; then
  fail "pip download failed"
fi
sdist=$(ls "$work"/llama_cpp_python-*.tar.gz 2>/dev/null | head -n 1)
[ -n "$sdist" ] || fail "no sdist in the download"
tar -xzf "$sdist" -C "$work" --wildcards '*/vendor/llama.cpp/ggml/*' || fail "could not extract $sdist"
ggml=$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp/ggml 2>/dev/null | head -n 1)
[ -n "$ggml" ] && [ -f "$ggml/src/ggml-quants.c" ] || fail "no vendor/llama.cpp/ggml/src/ggml-quants.c in the sdist"
flags=(-O2 -std=gnu11 -ffp-contract=off -I"$ggml/include" -I"$ggml/src")
"$CC" "${flags[@]}" -c "$ggml/src/ggml-quants.c" -o "$work/ggml-quants.o" >"$work/build.log" 2>&1 \
  || fail "compiling ggml-quants.c failed (tail: $(tail -n 1 "$work/build.log"))"
"$CC" "${flags[@]}" "$HERE/ggml_quantize_ref.c" "$work/ggml-quants.o" -lm -o "$work/ggml-quantize-ref" \
  >"$work/build.log" 2>&1 || fail "linking the driver failed (tail: $(tail -n 1 "$work/build.log"))"
mkdir -p "$PREFIX/bin"
cp "$work/ggml-quantize-ref" "$BIN.tmp" && mv "$BIN.tmp" "$BIN" || fail "could not install into $PREFIX/bin"
rm -rf "$work"
