#!/bin/sh
# Builds ./harness (run: OMP_NUM_THREADS=2 ./harness 2 400) from the probe variants, the span-32 kernel and the
# span-64 kernel of the library as they are now, and the AVX512-BF16 kernel the span-64 one replaced (from git,
# commit 96d8ca7), with three probes of it. Run from this directory inside the repository.
set -e
PY=${PY:-../../.venv/bin/python}
OUT=${OUT:-/tmp/lowbit_lut4_probe}
mkdir -p "$OUT"
HERE=$(pwd)
F="-O3 -mavx512f -mavx512bw -mavx512bf16 -mavx512vl -fopenmp -c"
"$PY" - "$OUT" <<'PYEOF'
import subprocess, sys
sys.path.insert(0, "../../src")
from lowbit.ops import cpu_lut4
out = sys.argv[1]
open(f"{out}/span32.c", "w").write(cpu_lut4._SOURCE)
open(f"{out}/span64.c", "w").write(cpu_lut4._SOURCE_SPAN64)
old = subprocess.run(["git", "show", "96d8ca7:src/lowbit/ops/cpu_lut4.py"], capture_output=True, text=True, check=True).stdout
ns = {}
exec(old[old.index("_C_PASSES = r"):old.index("_VARIANTS_BF16")], ns)  # the two C strings only
open(f"{out}/old_bf16.c", "w").write(ns["_SOURCE_BF16"])
PYEOF
cd "$OUT"
: > decls.h; : > table.h
add() { echo "DECL($1)" >> decls.h; echo "{\"$2\", (fn_f)$1, $3}," >> table.h; }
gcc $F -Dlowbit_cpu_ok=ok_32 span32.c -o span32.o; add lowbit_lut4_gemm "library span-32 kernel (float32)" 0
gcc $F -Dlowbit_cpu_ok=ok_64 span64.c -o span64.o
add lib64_f32 "library span-64 kernel, float32 tables" 0; add lib64_bf16 "library span-64 kernel, bf16 in, bf16 weights" 1
add lib64_bf16w "  span-64, bf16 weights, float32 x (no widening)" 0
# the same kernel with the round-up mask moved through a general register (what gcc emits for up[g])
sed 's/__asm__("kmovw %1, %0" : "=k"(k) : "m"(up\[g\]));/k = (__mmask16)up[g];/; s/lowbit_lut4_span64_gemm/gpr_span64_gemm/' span64.c > span64_gpr.c
grep -q "k = (__mmask16)up\[g\];" span64_gpr.c
gcc $F -Dlowbit_cpu_ok=ok_64g span64_gpr.c -o span64_gpr.o; add gpr64_bf16 "  span-64, bf16 weights, mask through a GPR" 1
gcc $F -Dlowbit_cpu_ok=ok_ob old_bf16.c -o ob.o; add lowbit_lut4_bf16_gemm "old bf16 kernel (vpermw + vdpbf16ps)" 1
sed 's/return (__m512i)_mm512_cvtne2ps_pbh(.*/return (__m512i)lut; (void)s0; (void)s1;/; s/lowbit_lut4_bf16_gemm/ob_notable/' old_bf16.c > ob1.c
gcc $F -Dlowbit_cpu_ok=ok_ob1 ob1.c -o ob1.o; add ob_notable "  old bf16, no table build (wrong y)" 1
sed 's/lowbit_lut4_bf16_gemm/ob_lookonly/; s/#define DOT(acc, w, xp) .*/#define DOT(acc, w, xp) acc = (__m512)_mm512_or_si512((__m512i)(acc), (__m512i)(w))/' old_bf16.c > ob2.c
gcc $F -Dlowbit_cpu_ok=ok_ob2 ob2.c -o ob2.o; add ob_lookonly "  old bf16, lookups only (OR for vdpbf16ps)" 1
sed 's/lowbit_lut4_bf16_gemm/ob_dotonly/; s/#include <stddef.h>/#include <stddef.h>\n#define _mm512_permutexvar_epi16(a, b) (a)/' old_bf16.c > ob3.c
gcc $F -Dlowbit_cpu_ok=ok_ob3 ob3.c -o ob3.o; add ob_dotonly "  old bf16, vdpbf16ps only (no vpermw)" 1
i=0
v() { i=$((i+1)); gcc $F -DNAME=probe$i $1 "$HERE/variants.c" -o probe$i.o; add probe$i "$2" 0; }
v "-DTABLE=0" "probe float32 tables"
v "-DTABLE=0 -DRSTEP=2" "probe float32 tables, 2 rows/step"
v "-DTABLE=0 -DRSTEP=4" "probe float32 tables, 4 rows/step"
v "-DTABLE=0 -DCHAIN=2" "probe float32 tables, 2 chains"
v "-DTABLE=0 -DCHAIN=8" "probe float32 tables, 8 chains"
v "-DTABLE=0 -DPF=1024" "probe float32 tables, prefetch 1024"
v "-DTABLE=0 -DPF=4096" "probe float32 tables, prefetch 4096"
v "-DTABLE=0 -DPF=4096 -DLOADS=1" "probe float32, PF 4096, offset loads"
v "-DTABLE=9" "probe no table build (wrong y)"
v "-DTABLE=0 -DMODE=1" "probe lookups only"
v "-DTABLE=2" "probe bf16: round on the bits"
v "-DTABLE=1" "probe bf16: magic add"
v "-DTABLE=3" "probe bf16: vcvtneps2bf16 + widen"
v "-DTABLE=6" "probe bf16: word tables, masked vpermw"
v "-DTABLE=7 -DPF=4096" "probe bf16: round-up masks, PF 4096"
v "-DTABLE=7 -DPF=4096 -DLOADS=1" "probe bf16: round-up masks, PF, offset loads"
cp "$HERE/harness.c" .
gcc -O2 -fopenmp -I. harness.c *.o -o harness
echo "built $OUT/harness"
