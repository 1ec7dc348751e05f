"""CPU kernels for 4-bit weights through a 16-entry lookup table: NF4/FP4 (any 16-entry code) and 4-bit IntAffine,
in float32, and NF4/FP4 with bf16 inputs on the reference's bf16 weights.

``y[m, n] = Σ_g scale[n, g] · Σ_{k ∈ g} x[m, k] · lut[code[n, k]]  −  Σ_g xsum[m, g] · shift[n, g]``

- NF4 / FP4 (``Codebook``): ``lut`` = the float32 code, ``scale`` = the first-level absmax per block, no shift.
- IntAffine 4-bit: ``lut = [0, 1, …, 15]``, ``scale`` per group and ``shift = zero_point · scale`` (applied with
  the per-group input sums ``xsum``, a ``(M, G) @ (G, N)`` matmul done by torch). 4-bit affine with group sizes
  that are multiples of 128 usually runs :mod:`lowbit.ops.cpu_vnni` instead (faster); these kernels take the rest.

Why hand-written: ATen has no lookup-table matmul (NF4 had no CPU fast path), and its int4 packed kernel runs a
scalar loop for float32 inputs. Both kernels build, per output row and group, the 16 weights ``lut · scale`` in one
register (``vmulps``), look 16 weights up per ``vpermps`` and multiply-add them with the float32 inputs (``vfmadd``,
four independent chains per input row): float32 math, so they match the float32 reference to float32 rounding;
bf16/fp16 inputs are widened exactly to float32.

**span 64** (AVX-512, :func:`span64_available`; group sizes that are multiples of 64; the one the dispatcher picks).
Layout: per 128 inputs 64 bytes = 16 dwords, nibble ``j`` of dword ``i`` holds the code of input ``16j + i`` (a last
64 inputs: 16 words, the same). ``vpermps`` reads bits 0-3 of each dword, so the dwords loaded 0-3 bytes further on
hold nibbles 0, 2, 4, 6 there and a 4-bit shift of each gives the odd ones: per 128 codes 4 shifts (port 0), 8
lookups (port 5) and 8 FMAs (either port), against 8 ``vpmovzxbd`` + 4 shifts on the span-32 kernel, whose index
widening competes with the lookups for port 5 (0.36 -> 0.22 ms on 4096², one row, results/cpu.md run 9).
**bf16 inputs** on codebook weights: the reference op dequantizes ``W = bf16(code · absmax)`` (the product in
float32, rounded to nearest-even) and multiplies in bf16 with float32 accumulation. The rounding direction of
each of a group's 16 products is found once, when packing, by torch's own float32 -> bf16 conversion of the same
float32 products (``round_up``: 16 bits per group, 2 bytes per 32 bytes of codes read in addition); the kernel
truncates its product to the top 16 bits and adds one bf16 unit where the mask says (``vpandd`` + a masked
``vpaddd``, against 5 instructions to round on the bits per table), so its weights are the reference's bit for bit
(tested with one-hot inputs, ties and subnormal products included); each bf16 × bf16 product is exact in float32
and the sums are float32. fp16 inputs and affine weights keep the float32 weights. A NaN product stays NaN (it is
quiet: truncation keeps its quiet bit). The kernel widens bf16 inputs itself.

**span 32** (AVX-512, else AVX2): groups that are multiples of 32 (the span-64 kernel takes those of 64), and the
AVX2 variant for laptops without AVX-512 (8-lane permutes of both table halves and a blend: about 3× the lookup
work). Layout ``codes (N, Kp/2) uint8`` where, for each chunk of 32 inputs, byte ``j`` holds the code of input ``j``
in its low nibble and of input ``j + 16`` in its high nibble; the lookups' indices come from ``vpmovzxbd`` (port 5,
like the lookups: why it is slower than span 64). ``span=128`` is the VNNI kernel's layout of the same codes (see
:func:`pack_lut4`).

Why not bf16 arithmetic: on this machine (results/cpu.md run 9) ``vdpbf16ps`` (32 multiply-adds) has the
throughput of one instruction per ~2.1 cycles, i.e. 16 multiply-adds per cycle, where two float32 FMAs per cycle
give 32; the previous bf16 kernel (``vpermw`` lookups, ``vdpbf16ps``) was no faster than the float32 one for it.

Both kernels: ``Kp`` = K padded to a whole group, ``x (M, Kp) float32`` zero-padded, one output row per step, rows
split over threads, input rows in passes of up to 4 (:data:`MAX_ROWS` at most). Compiled on first use by
:mod:`lowbit.ops.cpu_native`; no compiler or instruction set: :func:`available` / :func:`span64_available` are
``False`` (logged once) and callers keep their other paths.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from lowbit.ops import cpu_native

logger = logging.getLogger(__name__)

__all__ = ["Lut4Weight", "available", "span64_available", "isa", "pack_lut4", "pack_codebook", "pack_affine4", "lut4_linear", "MAX_ROWS"]

SPANS = (32, 64, 128)  # layouts: the span-32 kernel, the span-64 kernel, cpu_vnni.int4_linear
MAX_ROWS = 256  # input rows the op sends here: the weight is re-read per 4 rows, time grows ~linearly with M, and at
# 128 rows (4096², one thread) this kernel still took 92 ms against 274 ms for dequantize + matmul

# Shared by the AVX-512 kernels: passes of up to 4 input rows; in each, the weight's rows split evenly over threads,
# and ROWS(MB) (MB a constant after the switch, so each case compiles to its own loop) handles rows lo..hi-1.
_C_PASSES = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stddef.h>

#define LOWBIT_FOR_PASSES(M, N, n_threads, ROWS)                                                        \
    for (int m0 = 0; m0 < (M); m0 += 4) {                                                                \
        const int MB = (M) - m0 < 4 ? (M) - m0 : 4;                                                      \
        _Pragma("omp parallel for schedule(static) num_threads(n_threads)")                              \
        for (int t = 0; t < (n_threads); t++) {                                                          \
            const int lo = (int)((long)(N) * t / (n_threads)), hi = (int)((long)(N) * (t + 1) / (n_threads)); \
            switch (MB) {                                                                                \
                case 1: ROWS(1) break;                                                                   \
                case 2: ROWS(2) break;                                                                   \
                case 3: ROWS(3) break;                                                                   \
                default: ROWS(4) break;                                                                  \
            }                                                                                            \
        }                                                                                                \
    }
"""

_SOURCE = _C_PASSES + r"""
int lowbit_cpu_ok(void) { return __builtin_cpu_supports("avx512f"); }

/* MB input rows at once (1..4): four independent accumulators per row, one vpermps per 16 codes. The table is
   scaled by the group's scale first (code · scale in float32, as the reference dequantizes), so the
   accumulators run across groups with no per-group reduction (NF4 on 4096², one thread: 1.06 -> 0.92 ms at one
   row, 2.94 -> 2.28 ms at four, same process). */
static inline __attribute__((always_inline)) void row_kernel(
        const float *x, const uint8_t *q, const float *s, __m512 lut, float *y,
        int MB, int Kp, int N, int gs, int n) {
    __m512 a[4][4];
    for (int m = 0; m < MB; m++)
        for (int j = 0; j < 4; j++) a[m][j] = _mm512_setzero_ps();
    const int G = Kp / gs;
    for (int g = 0; g < G; g++) {
        const __m512 lg = _mm512_mul_ps(lut, _mm512_set1_ps(s[g]));
        const int k_end = (g + 1) * gs;
        int k = g * gs;
        for (; k + 64 <= k_end; k += 64) {  /* two chunks of 32 codes: four independent FMA chains */
            __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + k / 2)));
            __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + k / 2 + 16)));
            __m512 w0 = _mm512_permutexvar_ps(v0, lg);                      /* uses bits 0-3 of each lane */
            __m512 w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), lg);
            __m512 w2 = _mm512_permutexvar_ps(v1, lg);
            __m512 w3 = _mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), lg);
            for (int m = 0; m < MB; m++) {
                const float *xk = x + (size_t)m * Kp + k;
                a[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xk), a[m][0]);
                a[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xk + 16), a[m][1]);
                a[m][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xk + 32), a[m][2]);
                a[m][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xk + 48), a[m][3]);
            }
        }
        if (k < k_end) {  /* a last chunk of 32 (group sizes 32, 96, ...) */
            __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + k / 2)));
            __m512 w0 = _mm512_permutexvar_ps(v0, lg);
            __m512 w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), lg);
            for (int m = 0; m < MB; m++) {
                const float *xk = x + (size_t)m * Kp + k;
                a[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xk), a[m][0]);
                a[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xk + 16), a[m][1]);
            }
        }
    }
    for (int m = 0; m < MB; m++)
        y[(size_t)m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[m][0], a[m][1]),
                                                                  _mm512_add_ps(a[m][2], a[m][3])));
}

void lowbit_lut4_gemm(const float *x, const uint8_t *q, const float *s, const float *lut16, float *y,
                      int M, int N, int Kp, int gs, int n_threads) {
    __m512 lut = _mm512_loadu_ps(lut16);
    #define LUT4_ROWS(MB_)                                                                                \
        for (int n = lo; n < hi; n++)                                                                     \
            row_kernel(x + (size_t)m0 * Kp, q + (size_t)n * (Kp / 2), s + (size_t)n * (Kp / gs), lut,      \
                       y + (size_t)m0 * N, MB_, Kp, N, gs, n);
    LOWBIT_FOR_PASSES(M, N, n_threads, LUT4_ROWS)
    #undef LUT4_ROWS
}
"""


_SOURCE_AVX2 = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stddef.h>

int lowbit_cpu_ok(void) { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

/* 16-entry lookup with 8-lane permutes: both halves of the table, then a blend on bit 3 of the index. */
static inline __attribute__((always_inline)) __m256 lut16(__m256i idx, __m256 lo8, __m256 hi8) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo8, idx), _mm256_permutevar8x32_ps(hi8, idx),
                            _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One input row, one output row: per 32 codes (16 bytes, span-32 layout) four 8-lane FMA chains. */
static inline __attribute__((always_inline)) float row_kernel(
        const float *x, const uint8_t *q, const float *s, __m256 lo8, __m256 hi8, int Kp, int gs) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int g = 0; g < Kp / gs; g++) {  /* the table scaled by the group's scale, as in the AVX-512 kernel */
        const __m256 sg = _mm256_set1_ps(s[g]), l8 = _mm256_mul_ps(lo8, sg), h8 = _mm256_mul_ps(hi8, sg);
        for (int k = g * gs; k < (g + 1) * gs; k += 32) {
            __m128i b = _mm_loadu_si128((const __m128i *)(q + k / 2));
            __m256i v0 = _mm256_cvtepu8_epi32(b);                     /* bytes 0-7: codes k.., k + 16.. */
            __m256i v1 = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));  /* bytes 8-15: codes k + 8.., k + 24.. */
            a0 = _mm256_fmadd_ps(lut16(v0, l8, h8), _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(lut16(_mm256_srli_epi32(v0, 4), l8, h8), _mm256_loadu_ps(x + k + 16), a1);
            a2 = _mm256_fmadd_ps(lut16(v1, l8, h8), _mm256_loadu_ps(x + k + 8), a2);
            a3 = _mm256_fmadd_ps(lut16(_mm256_srli_epi32(v1, 4), l8, h8), _mm256_loadu_ps(x + k + 24), a3);
        }
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

void lowbit_lut4_gemm(const float *x, const uint8_t *q, const float *s, const float *lut16v, float *y,
                      int M, int N, int Kp, int gs, int n_threads) {
    __m256 lo8 = _mm256_loadu_ps(lut16v), hi8 = _mm256_loadu_ps(lut16v + 8);
    #pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int t = 0; t < n_threads; t++) {
        int lo = (int)((long)N * t / n_threads), hi = (int)((long)N * (t + 1) / n_threads);
        for (int n = lo; n < hi; n++)
            for (int m = 0; m < M; m++)
                y[(size_t)m * N + n] = row_kernel(x + (size_t)m * Kp, q + (size_t)n * (Kp / 2),
                                                  s + (size_t)n * (Kp / gs), lo8, hi8, Kp, gs);
    }
}
"""

_VARIANTS = {"avx512": (_SOURCE, ("-mavx512f",)), "avx2": (_SOURCE_AVX2, ("-mavx2", "-mfma"))}

_SOURCE_SPAN64 = _C_PASSES + r"""
#include <stdlib.h>
#include <string.h>

int lowbit_cpu_ok(void) { return __builtin_cpu_supports("avx512f"); }

#ifndef PF_AHEAD
#define PF_AHEAD 4096  /* software prefetch distance in code bytes, as in cpu_vnni (results/cpu.md run 7) */
#endif

/* The 16 weights of a group: lut·s in float32; with UP, that product rounded to bf16: truncated to its top 16 bits
   and raised by one bf16 unit where bit j of the group's round-up mask says (computed when packing, by torch's
   float32 -> bf16 rounding of the same float32 products: the reference's bf16 weights; measured against rounding
   here on the bits, 5 more instructions per table: 0.29 vs 0.34 ms, results/cpu.md run 9). */
static inline __attribute__((always_inline)) __m512 group_table(__m512 lut, float s, const uint16_t *up, int g,
                                                                const int UP) {
    const __m512 t = _mm512_mul_ps(lut, _mm512_set1_ps(s));
    if (!UP) return t;
    const __m512i b = _mm512_and_si512(_mm512_castps_si512(t), _mm512_set1_epi32((int)0xFFFF0000));
    __mmask16 k;  /* kmovw from memory: a load (gcc goes through a general register: a port-5 slot) */
    __asm__("kmovw %1, %0" : "=k"(k) : "m"(up[g]));
    return _mm512_castsi512_ps(_mm512_mask_add_epi32(b, k, b, _mm512_set1_epi32(0x10000)));
}

/* MB input rows (1..4), one output row, four FMA chains per input row. Per 128 codes (64 bytes, 16 dwords; nibble
   j of dword i is code 16j + i): vpermps reads bits 0-3 of each dword, so the dword loaded 0, 1, 2, 3 bytes further
   on holds nibbles 0, 2, 4, 6 there and a 4-bit shift of each gives 1, 3, 5, 7: 4 shifts (port 0) and 8 lookups
   (port 5) per 128 codes, the 8 FMAs on either port (the span-32 kernel spends 8 vpmovzxbd on port 5, where vpermps
   also runs). The loads reach 3 bytes past a row: the codes are allocated with 64 bytes to spare. Nibbles 0-3 are
   the first 64 codes (table A), 4-7 the next 64 (table B). A last 64 codes: 16 words, nibble j of word i = code
   16j + i. */
static inline __attribute__((always_inline)) void span64_row(
        const float *x, const uint8_t *q, const float *s, const uint16_t *up, __m512 lut, float *sums,
        const int MB, const int UP, int Kp, int gs) {
    __m512 a[4][4];
    for (int m = 0; m < MB; m++)
        for (int j = 0; j < 4; j++) a[m][j] = _mm512_setzero_ps();
    const int halves = gs / 64;
    int g = 0, h = 0, k = 0;  /* group of the current 64 codes, and which 64 of that group */
    for (; k + 128 <= Kp; k += 128) {
        const int gA = g;
        if (++h == halves) { h = 0; g++; }
        const int gB = g;
        if (++h == halves) { h = 0; g++; }
        const uint8_t *qk = q + k / 2;
        _mm_prefetch((const char *)(qk + PF_AHEAD), _MM_HINT_T0);  /* into the next rows: rows are contiguous */
        const __m512 tA = group_table(lut, s[gA], up, gA, UP);
        const __m512 tB = gB == gA ? tA : group_table(lut, s[gB], up, gB, UP);
        const __m512i v0 = _mm512_loadu_si512((const void *)qk), v1 = _mm512_loadu_si512((const void *)(qk + 1));
        const __m512i v2 = _mm512_loadu_si512((const void *)(qk + 2)), v3 = _mm512_loadu_si512((const void *)(qk + 3));
        const __m512 w[8] = {
            _mm512_permutexvar_ps(v0, tA), _mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), tA),
            _mm512_permutexvar_ps(v1, tA), _mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), tA),
            _mm512_permutexvar_ps(v2, tB), _mm512_permutexvar_ps(_mm512_srli_epi32(v2, 4), tB),
            _mm512_permutexvar_ps(v3, tB), _mm512_permutexvar_ps(_mm512_srli_epi32(v3, 4), tB)};
        for (int m = 0; m < MB; m++)
            for (int j = 0; j < 8; j++)
                a[m][j & 3] = _mm512_fmadd_ps(w[j], _mm512_loadu_ps(x + (size_t)m * Kp + k + 16 * j), a[m][j & 3]);
    }
    if (k < Kp) {  /* Kp is a multiple of 64 */
        const __m512 t = group_table(lut, s[g], up, g, UP);
        const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(q + k / 2)));
        const __m512 w[4] = {
            _mm512_permutexvar_ps(v, t), _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t),
            _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8), t), _mm512_permutexvar_ps(_mm512_srli_epi32(v, 12), t)};
        for (int m = 0; m < MB; m++)
            for (int j = 0; j < 4; j++)
                a[m][j] = _mm512_fmadd_ps(w[j], _mm512_loadu_ps(x + (size_t)m * Kp + k + 16 * j), a[m][j]);
    }
    for (int m = 0; m < MB; m++)
        sums[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[m][0], a[m][1]), _mm512_add_ps(a[m][2], a[m][3])));
}

/* y[i] = v (+ the bias) as float32, or rounded to bf16 as torch rounds (to nearest even; NaN -> 0x7FC0): a bf16 caller
   then needs no separate cast of the output (~10 us of a 0.35 ms call at 4096^2, measured) */
static inline void put(void *y, size_t i, float v, int y_bf16) {
    if (!y_bf16) { ((float *)y)[i] = v; return; }
    uint32_t u;
    memcpy(&u, &v, 4);
    ((uint16_t *)y)[i] = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7FC0
                                                         : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* up (N, G) round-up masks, or NULL: float32 tables. bias (N) float32, or NULL. y (M, N): float32, or bf16 (y_bf16).
   x (M, Kp): float32, or bf16 (x_bf16), widened here into
   scratch (a torch conversion before the call cost ~15 µs more at one row, measured). One output row per step at
   every MB (2 or 4 rows per step were not faster at one input row: results/cpu.md run 9). Returns 0, or -1 when
   out of memory. */
int lowbit_lut4_span64_gemm(const void *xv, const uint8_t *q, const float *s, const float *lut16, const uint16_t *up,
                            const float *bias, void *y, int M, int N, int Kp, int gs, int x_bf16, int y_bf16,
                            int n_threads) {
    const __m512 lut = _mm512_loadu_ps(lut16);
    const size_t Kb = (size_t)Kp / 2, G = (size_t)(Kp / gs);
    float *xw = 0;
    if (x_bf16) {
        const uint16_t *xh = (const uint16_t *)xv;
        /* 64-byte aligned: zmm loads of x that cross cache lines made the call ~20 % slower (0.41 vs 0.34 ms) */
        if (!(xw = aligned_alloc(64, sizeof(float) * (size_t)M * Kp))) return -1;
        for (size_t i = 0; i < (size_t)M * Kp; i++) { uint32_t b = (uint32_t)xh[i] << 16; memcpy(xw + i, &b, 4); }
    }
    const float *x = x_bf16 ? xw : (const float *)xv;
    #define SPAN64_ROWS(MB_)                                                                              \
        for (int n = lo; n < hi; n++) {                                                                   \
            float sums[4];                                                                                \
            if (up) span64_row(x + (size_t)m0 * Kp, q + n * Kb, s + n * G, up + n * G, lut, sums, MB_, 1, \
                               Kp, gs);                                                                   \
            else span64_row(x + (size_t)m0 * Kp, q + n * Kb, s + n * G, up, lut, sums, MB_, 0, Kp, gs);   \
            for (int m = 0; m < MB_; m++)                                                                 \
                put(y, (size_t)(m0 + m) * N + n, bias ? sums[m] + bias[n] : sums[m], y_bf16);             \
        }
    LOWBIT_FOR_PASSES(M, N, n_threads, SPAN64_ROWS)
    #undef SPAN64_ROWS
    free(xw);
    return 0;
}
"""

_VARIANTS_SPAN64 = {"avx512": (_SOURCE_SPAN64, ("-mavx512f",))}


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    """The AVX-512 kernel, else the AVX2 one (``LOWBIT_CPU_ISA=avx2`` forces the latter: tests)."""
    return cpu_native.load_variant("lut4", _VARIANTS, {"lowbit_lut4_gemm": (None, 5, 5)})


@lru_cache(maxsize=1)
def _lib_span64() -> ctypes.CDLL | None:
    """The AVX-512 span-64 kernel, or None (no compiler or no AVX-512: logged once by :mod:`lowbit.ops.cpu_native`;
    ``LOWBIT_CPU_ISA`` forcing a variant it does not have, e.g. ``avx2``)."""
    forced = os.environ.get("LOWBIT_CPU_ISA")
    if forced is not None and forced not in _VARIANTS_SPAN64 and forced in _VARIANTS:
        logger.info("LOWBIT_CPU_ISA=%s: the span-64 lut4 kernel (avx512 only) is not used", forced)
        return None
    return cpu_native.load_variant("lut4_span64", _VARIANTS_SPAN64, {"lowbit_lut4_span64_gemm": (ctypes.c_int, 7, 7)})


def isa() -> str | None:
    """Which variant runs here (``"avx512"``, ``"avx2"``), or None."""
    lib = _lib()
    return None if lib is None else lib.lowbit_isa


def available() -> bool:
    """Whether the compiled kernel loads here (AVX-512 CPU and a working C compiler); cached per process."""
    return _lib() is not None


def span64_available() -> bool:
    """Whether the span-64 kernel (AVX-512; float32 and bf16 inputs) loads here (and a C compiler); cached."""
    return _lib_span64() is not None


@dataclass(frozen=True, eq=False)
class Lut4Weight:
    """The kernel layout (module docstring). ``shift (N, G)`` float32 or None; ``perm (K,)`` for act-order;
    ``round_up`` the span-64 kernel's bf16 rounding masks (codebooks only). Build it with :func:`pack_lut4` (or the
    ``pack_*`` helpers): span-64 ``codes`` sit in storage with 64 spare bytes after them, which the kernel reads."""

    codes: torch.Tensor
    scale: torch.Tensor
    lut: torch.Tensor
    shift: torch.Tensor | None
    group_size: int
    in_features: int
    padded_in: int
    perm: torch.Tensor | None
    span: int = 32
    round_up: torch.Tensor | None = None  # span 64, codebooks: (N, G) int16 masks, bit j = bf16(lut[j]·scale) rounds up

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]


def pack_lut4(codes: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor, group_size: int,
              shift: torch.Tensor | None = None, perm: torch.Tensor | None = None, span: int = 32) -> Lut4Weight:
    """Build the kernel layout from codes ``(N, K)`` in [0, 16), ``scale (N, ceil(K/group_size))``.

    ``span=32``: the span-32 kernel's layout. ``span=64``: the span-64 kernel's (module docstring; group sizes
    multiple of 64). ``span=128``: byte ``i`` of each 64-byte block holds codes ``i`` and ``i + 64`` of its 128 inputs, the
    layout of :func:`lowbit.ops.cpu_vnni.int4_linear` (group sizes multiple of 128).

    Raises:
        ValueError: a group size that is not a multiple of ``span``, codes out of range, or mismatched shapes.
    """
    if span not in SPANS:
        raise ValueError(f"span must be one of {SPANS}, got {span!r}")
    if group_size <= 0 or group_size % span:
        raise ValueError(f"this layout (span {span}) takes group sizes that are multiples of {span}, got {group_size}")
    N, K = codes.shape
    G = -(-K // group_size)
    Kp = G * group_size
    if scale.shape != (N, G):
        raise ValueError(f"scale must be (out_features, groups) = {(N, G)}, got {tuple(scale.shape)}")
    if lut.numel() != 16:
        raise ValueError(f"lut must hold 16 values, got {lut.numel()}")
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, Kp - K))
    if int(c.max()) > 15:
        raise ValueError("codes must be in [0, 16)")
    if span == 64:  # per 128 codes 16 dwords, nibble j of dword i = code 16j + i; a last 64: 16 words, the same
        n2 = Kp // 128 * 128
        parts = [c[:, :n2].reshape(N, -1, 8, 16), c[:, n2:].reshape(N, -1, 4, 16)]  # (N, blocks, nibble j, i)
        packed = torch.cat([(t[:, :, 0::2] | (t[:, :, 1::2] << 4)).transpose(2, 3).reshape(N, -1) for t in parts], 1)
        spare = torch.zeros(N * (Kp // 2) + 64, dtype=torch.uint8)  # the kernel's offset loads read 3 bytes past a row
        spare[: packed.numel()] = packed.reshape(-1)
        packed = spare[: packed.numel()].view(N, Kp // 2)
    else:  # byte i of each span // 2 bytes: code i (low nibble), code i + span // 2 (high nibble)
        c = c.reshape(N, Kp // span, 2, span // 2)
        packed = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(N, Kp // 2).contiguous()
    scale32 = scale.to(torch.float32).contiguous()
    lut32 = lut.to(torch.float32).contiguous()
    round_up = None
    if span == 64 and shift is None:
        round_up = _bf16_round_up(lut32, scale32)
    return Lut4Weight(packed, scale32, lut32, None if shift is None else shift.to(torch.float32).contiguous(), group_size,
                      K, Kp, perm, span, round_up)


def _bf16_round_up(lut: torch.Tensor, scale: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """``(N, G)`` int16 masks for the span-64 kernel: bit ``j`` set where torch's bf16 rounding of the float32 product
    ``lut[j] · scale[n, g]`` (the reference's bf16 weight) is one bf16 unit above the product's top 16 bits; NaN
    products are left truncated (a float32 product's NaN is quiet, so it stays NaN). ``rows`` at a time (memory)."""
    bit = torch.arange(16, dtype=torch.int32)
    out = []
    for s in scale.split(rows):
        t = lut.view(1, 1, 16) * s.unsqueeze(-1)
        up = (t.to(torch.bfloat16).float().view(torch.int32) != (t.view(torch.int32) & -65536)) & ~t.isnan()
        r = (up.to(torch.int32) << bit).sum(-1, dtype=torch.int32)
        out.append((r - (r >> 15) * 65536).to(torch.int16))  # the same 16 bits as int16 (bit 15 is the sign)
    return torch.cat(out).contiguous()


def pack_codebook(q, span: int = 32) -> Lut4Weight:  # type: ignore[no-untyped-def]
    """NF4 / FP4 (``Codebook`` with 4-bit codes, double quantization or not), for the span-32 kernel
    (``span=32``) or the span-64 one (``span=64``: float32 inputs, and bf16 inputs with the reference's bf16 weights).

    Blocks run over the row-major flattened weight, so a row may start inside a block: the kernel's groups are
    ``gcd(in_features, block_size)`` wide and each takes its block's absmax.

    Raises:
        ValueError: not a 4-bit codebook, or ``gcd(in_features, block_size)`` not a multiple of ``span``.
    """
    from lowbit.formats.bitpack import unpack

    fmt = q.format
    if fmt.kind != "codebook" or fmt.bits != 4:
        raise ValueError(f"pack_codebook takes 4-bit codebook weights, got {fmt.spec()}")
    N, K = q.shape
    g = math.gcd(K, fmt.block_size)
    if g % span:
        raise ValueError(f"gcd(in_features={K}, block_size={fmt.block_size}) = {g} is not a multiple of {span}")
    idx = unpack(q["qdata"].unsqueeze(0), 4, q.numel + q.numel % 2).reshape(-1)[: q.numel].reshape(N, K)
    start = torch.arange(N).unsqueeze(1) * K + torch.arange(K // g).unsqueeze(0) * g  # first weight of each group
    absmax = fmt.absmax(q)[start // fmt.block_size]
    return pack_lut4(idx, absmax, fmt.code, g, span=span)


def pack_affine4(q, span: int = 32) -> Lut4Weight:  # type: ignore[no-untyped-def]
    """4-bit ``IntAffine`` (symmetric or not, integer or float zero points, act-order ``g_idx``).

    Per-channel weights (one group) get a group of ``in_features`` rounded up to ``span``.

    Raises:
        ValueError: not 4-bit affine, or a group size that is not a multiple of ``span``.
    """
    from lowbit.ops.repack import repack_quantized, unpack_planes

    pw = repack_quantized(q)
    if pw.mode != "affine" or pw.bits != 4:
        raise ValueError(f"pack_affine4 takes affine 4-bit weights, got mode={pw.mode!r} bits={pw.bits}")
    K = pw.in_features
    g = pw.group_size if pw.group_size < K else -(-K // span) * span
    codes = unpack_planes(pw.q4, pw.q2, pw.q1, 4, K)  # (N, K) in the kernel (permuted) column order
    assert pw.scale is not None and pw.zero_point is not None
    G = -(-K // g)
    s, z = pw.scale.float(), pw.zero_point.float()
    if s.shape[0] != G:
        s, z = s[:1].expand(G, -1), z[:1].expand(G, -1)
    return pack_lut4(codes, s.t(), torch.arange(16, dtype=torch.float32), g, shift=(z * s).t().contiguous(),
                     perm=pw.perm, span=span)


def lut4_linear(x: torch.Tensor, w: Lut4Weight, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x (..., K) -> (..., N)`` through the kernel of ``w``'s layout; output in ``out_dtype`` (default: ``x``'s).

    ``span=32``: the span-32 kernel; ``span=64``: the span-64 kernel. Both compute in float32 with the inputs widened
    exactly (bf16, fp16). Weights: ``lut · scale`` in float32, except codebook weights (no ``shift``) on the span-64
    kernel with bf16 inputs, which take the reference's bf16 weights ``bf16(lut · scale)``. Bias is added in
    float32 before the output is cast.

    Raises:
        RuntimeError: that kernel is not available here (check :func:`available` / :func:`span64_available`).
        ValueError: another layout (``span=128`` is :func:`lowbit.ops.cpu_vnni.int4_linear`'s), ``x`` has not
            ``in_features`` features (the kernel would read past the input), or span-64 codes without the spare
            bytes :func:`pack_lut4` allocates after them (the kernel would read past the codes).
    """
    if w.span not in (32, 64):
        raise ValueError(f"lut4_linear takes the span-32 or span-64 layout, got span {w.span}")
    if x.dim() == 0 or x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} features, the weight {w.in_features}")
    if w.span == 64 and (not w.codes.is_contiguous() or w.codes.untyped_storage().nbytes()
                         < w.codes.storage_offset() + w.codes.numel() + 3):
        # the offset loads read 3 bytes past the last row: a copy of the codes (clone, load) would be read past its end
        raise ValueError("span-64 codes need the spare bytes pack_lut4 allocates after them; rebuild the weight with "
                         "pack_lut4 / pack_codebook / pack_affine4 (span=64) instead of copying its codes")
    lib = _lib() if w.span == 32 else _lib_span64()
    if lib is None:
        raise RuntimeError(f"the span-{w.span} lut4 CPU kernel is not available here "
                           "(needs a C compiler and AVX-512, or AVX2 for the span-32 one)")
    # the span-64 kernel widens bf16 inputs itself (float32 math on the same values)
    x2 = cpu_native.as_rows(x, torch.bfloat16 if w.span == 64 and x.dtype == torch.bfloat16 else torch.float32)
    if w.perm is not None:
        x2 = x2.index_select(1, w.perm.long())
    if w.padded_in != w.in_features:
        x2 = torch.nn.functional.pad(x2, (0, w.padded_in - w.in_features))
    x2 = x2.contiguous()
    M, N = x2.shape[0], w.out_features
    if w.span == 32:
        y = torch.empty(M, N, dtype=torch.float32)
        lib.lowbit_lut4_gemm(x2.data_ptr(), w.codes.data_ptr(), w.scale.data_ptr(), w.lut.data_ptr(), y.data_ptr(), M,
                             N, w.padded_in, w.group_size, torch.get_num_threads())
    else:
        # bf16 inputs on a codebook: the reference's bf16 weights through the round-up masks. With nothing to do
        # after the kernel (no shift to subtract), it adds a (N,) bias and writes a bf16 output itself
        up = w.round_up if x.dtype == torch.bfloat16 and w.round_up is not None else None
        last = w.shift is None
        y_bf16 = last and (x.dtype if out_dtype is None else out_dtype) == torch.bfloat16
        kb = bias.to(torch.float32).contiguous() if last and bias is not None and bias.shape == (N,) else None
        y = torch.empty(M, N, dtype=torch.bfloat16 if y_bf16 else torch.float32)
        if lib.lowbit_lut4_span64_gemm(x2.data_ptr(), w.codes.data_ptr(), w.scale.data_ptr(), w.lut.data_ptr(),
                                       0 if up is None else up.data_ptr(), 0 if kb is None else kb.data_ptr(),
                                       y.data_ptr(), M, N, w.padded_in, w.group_size, int(x2.dtype == torch.bfloat16),
                                       int(y_bf16), torch.get_num_threads()):
            raise MemoryError("no memory for the widened inputs")
        if kb is not None:
            bias = None  # added by the kernel
    if w.shift is not None:
        y -= x2.float().reshape(M, -1, w.group_size).sum(-1) @ w.shift.t()
    if bias is not None:
        y += bias.to(torch.float32)
    if out_dtype is not None and out_dtype != x.dtype:
        return y.to(out_dtype).reshape(*x.shape[:-1], N)
    return cpu_native.like_input(y, x)
