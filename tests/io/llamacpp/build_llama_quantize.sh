#!/usr/bin/env bash
# Builds llama.cpp's llama-quantize tool (tools/quantize + the parts of common/ it uses) against an existing
# libllama build, without building all of common/ (quantize_stubs.cpp supplies the few symbols common.cpp
# references but llama-quantize never calls; each aborts if reached). A full cmake build with
# -DLLAMA_BUILD_TOOLS=ON --target llama-quantize gives the same tool.
# usage: build_llama_quantize.sh LLAMA_SRC LLAMA_BUILD OUT_DIR   (then LOWBIT_LLAMA_QUANTIZE=OUT_DIR/llama-quantize)
set -euo pipefail
src=$1
build=$2
out=$3
here=$(cd "$(dirname "$0")" && pwd)
lib=$(dirname "$(find "$build" -name 'libllama.so' | head -1)")
info=$(find "$build" -name build-info.cpp | head -1)
mkdir -p "$out"
flags=(-O1 -std=gnu++17 -I"$src/include" -I"$src/ggml/include" -I"$src/common" -I"$src/vendor"
       -I"$(dirname "$info")" -D_GNU_SOURCE)
for f in "$src/tools/quantize/quantize.cpp" "$src/tools/quantize/main.cpp" "$src/common/imatrix-loader.cpp" \
         "$src/common/log.cpp" "$src/common/json.cpp" "$src/common/common.cpp" "$info" "$here/quantize_stubs.cpp"; do
    c++ "${flags[@]}" -c "$f" -o "$out/$(basename "${f%.cpp}").o"
done
c++ -o "$out/llama-quantize" "$out"/*.o -L"$lib" -lllama -lggml -lggml-base -Wl,-rpath,"$lib" -lpthread
echo "$out/llama-quantize"
