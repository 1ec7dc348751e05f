#!/usr/bin/env bash
# Adds ggml's BLAS backend to an existing CPU build of llama.cpp without rebuilding it: compiles ggml-blas.cpp and
# a libggml (backend registry) with GGML_USE_BLAS, linked against the build's libggml-base/libggml-cpu and OpenBLAS
# (Debian: apt-get install libopenblas-dev). These are the same sources and defines `cmake -DGGML_BLAS=ON
# -DGGML_BLAS_VENDOR=OpenBLAS` compiles; a full cmake build with that option works as well.
# usage: build_blas_ggml.sh LLAMA_SRC LLAMA_BUILD OUT_DIR
# then run the client with LD_LIBRARY_PATH=OUT_DIR (tests/io/test_llamacpp_slow.py: LOWBIT_LLAMA_BLAS_LIBS=OUT_DIR).
set -euo pipefail
src=$1/ggml
lib=$(dirname "$(find "$2" -name 'libggml-base.so' | head -1)")
out=$3
mkdir -p "$out"
flags=(-DGGML_BACKEND_SHARED -DGGML_BUILD -DGGML_SCHED_MAX_COPIES=4 -DGGML_SHARED -D_GNU_SOURCE -D_XOPEN_SOURCE=600
       -I"$src/include" -I"$src/src" -O3 -DNDEBUG -fPIC -std=gnu++17)
blas_inc=$(dirname "$(find /usr/include -name cblas.h -path '*openblas*' | head -1)")
c++ "${flags[@]}" -DGGML_BACKEND_BUILD -DGGML_BLAS_USE_OPENBLAS -I"$blas_inc" -c "$src/src/ggml-blas/ggml-blas.cpp" \
    -o "$out/ggml-blas.o"
c++ -shared -o "$out/libggml-blas.so" -Wl,-soname,libggml-blas.so "$out/ggml-blas.o" -L"$lib" -lggml-base -lopenblas \
    -Wl,-rpath,"$lib"
for f in ggml-backend-reg ggml-backend-dl; do
    c++ "${flags[@]}" -DGGML_USE_CPU -DGGML_USE_BLAS -Dggml_EXPORTS -c "$src/src/$f.cpp" -o "$out/$f.o"
done
c++ -shared -o "$out/libggml.so.0" -Wl,-soname,libggml.so.0 "$out/ggml-backend-reg.o" "$out/ggml-backend-dl.o" \
    -L"$lib" -L"$out" -lggml-cpu -lggml-base -lggml-blas -Wl,-rpath,"$out:$lib" -ldl
ln -sf libggml.so.0 "$out/libggml.so"
echo "$out"
