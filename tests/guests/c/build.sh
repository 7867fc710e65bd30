#!/bin/sh
# Rebuild kv.wasm from kv.c with Debian's clang (the committed kv.wasm means CI needs no clang):
#   apt-get update && apt-get install -y clang lld wasi-libc libclang-rt-14-dev-wasm32
# Usage: ./build.sh [OUTPUT]   (default: kv.wasm next to this script)
# A reactor-style module: no entry point, no start function, only the exports kv.c names, and
# its memory exported as `memory` (wasm-ld's default). Uses wasi-libc's malloc and string
# functions only, so it imports nothing but the `sidecar` module.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-$HERE/kv.wasm}
CC=${CC:-clang}
"$CC" --target=wasm32-wasi -O2 -Wall -Wextra -Werror \
    -nostartfiles -Wl,--no-entry -Wl,--strip-all \
    -o "$OUT" "$HERE/kv.c"
echo "built $OUT ($(wc -c < "$OUT") bytes)"
