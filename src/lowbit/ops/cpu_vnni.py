"""Weight-only int8 (W8A16) and 4-bit affine weights on the CPU's int8 dot-product instructions (VNNI), with float
inputs.

The int8 weight is ``W = qdata · scale[:, None]`` (``Int8Rowwise`` without activation quantization). Its reference
multiplies float inputs by the dequantized weight; ATen's int8 packed kernel does that at about a third of the
speed of torch's dynamic int8 (which quantizes the inputs to 8 bits: another format). Here each input row is
split exactly-enough into int8 limbs::

    x ≈ s1·q1 + s2·q2 + s3·q3,   s1 = max|x|/127,  s2 = s1/254,  s3 = s2/254,   q_l ∈ [-127, 127]

(each limb rounds what the previous ones left, so ``|x − x̂| ≤ s3/2 = max|x| / (127·254²·2) ≈ 6.1e-8·max|x|``,
below float32's own rounding of values near ``max|x|``; bf16/fp16 inputs take two limbs, ``≤ 1.6e-5·max|x|``),
and ``x̂ · qdataᵀ`` is exact int8 × int8 → int32 dot products per output (``vpdpbusd``: 64 multiply-adds per
instruction; the unsigned operand is ``q + 128`` and ``128·Σ_k qdata[n, k]`` is subtracted). The kernel reads the
int8 weight once for all limbs, so it runs at the speed of the weight read — W8A8's speed with float-input
accuracy. 4-bit affine weights (:func:`int4_linear`) use the same limbs as the signed operand and the 4-bit codes
as the unsigned one, per group, then the group scales and the zero-point term. Inf/NaN inputs give NaN rows.
Tested against the float64 product.

Compiled on first use by :mod:`lowbit.ops.cpu_native`: AVX-512 VNNI kernels, else 256-bit AVX-VNNI ones (laptops
without AVX-512; ``LOWBIT_CPU_ISA=avx2`` forces them); unavailable (``available() == False``) without a C compiler
or either instruction set.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache

import torch

from lowbit.ops import cpu_native

__all__ = ["W8Weight", "available", "isa", "pack_w8", "w8_linear", "split_limbs", "limbs_for", "pack_int4", "int4_linear",
           "LIMBS", "MAX_ROWS"]

LIMBS = 3  # for float32 inputs: error ≤ max|x| / (127·254²·2) ≈ 6.1e-8·max|x|


def limbs_for(dtype: torch.dtype) -> int:
    """Limbs per input: 3 for float32 (float32's level), 2 for bf16/fp16 inputs (error ≤ max|x|/(127·254·2)
    ≈ 1.6e-5·max|x|, far below the 2^-9 relative rounding of the bf16 output itself)."""
    return 2 if dtype in (torch.bfloat16, torch.float16) else LIMBS
MAX_ROWS = 256  # input rows the op sends here: the weight is re-read per 2-4 rows, time grows ~linearly with M; at
# 128 rows (4096², one thread) int4 took 44 ms (bf16) / 66 ms (float32) against ATen int4pack 62 ms and dequantize +
# matmul 309 ms, int8 28 ms against ATen int8pack 63 ms

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stddef.h>

int lowbit_cpu_ok(void) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vnni");
}

#define LMAX 3  /* limbs: 2 or 3 (NL) */
#ifndef PF_AHEAD
/* software prefetch distance in weight bytes. 1024 (the first choice, tuned on one warm 4096² weight) left the loads
   of weights read from DRAM waiting: with 35-52 rotating copies (600 MB, past the L3) 4096 took int8 0.70 -> 0.62 ms
   and int4 0.43 -> 0.36 ms on 4096², with warm weights unchanged (benchmarks/cpu_prefetch.py, results/cpu.md run 7) */
#define PF_AHEAD 4096
#endif
/* MB rows (1..4) x L limbs: two accumulators each (k and k + 64), 64 unsigned x signed byte products each. */
static inline __attribute__((always_inline)) void row_kernel(
        const uint8_t *xu, const double *sx, const int8_t *w, int32_t off, double sw, float *y,
        int MB, int NL, int Kp, int N, int n) {
    __m512i a[4][LMAX][2];
    for (int m = 0; m < MB; m++)
        for (int l = 0; l < NL; l++) a[m][l][0] = a[m][l][1] = _mm512_setzero_si512();
    int k = 0;
    for (; k + 128 <= Kp; k += 128) {
        /* PF_AHEAD bytes ahead (into the next rows: rows are contiguous); benchmarks/cpu_prefetch.py */
        _mm_prefetch((const char *)(w + k + PF_AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + k + PF_AHEAD + 64), _MM_HINT_T0);
        __m512i w0 = _mm512_loadu_si512((const void *)(w + k));
        __m512i w1 = _mm512_loadu_si512((const void *)(w + k + 64));
        for (int m = 0; m < MB; m++)
            for (int l = 0; l < NL; l++) {
                const uint8_t *xl = xu + ((size_t)m * NL + l) * Kp + k;
                a[m][l][0] = _mm512_dpbusd_epi32(a[m][l][0], _mm512_loadu_si512((const void *)xl), w0);
                a[m][l][1] = _mm512_dpbusd_epi32(a[m][l][1], _mm512_loadu_si512((const void *)(xl + 64)), w1);
            }
    }
    if (k < Kp) {  /* Kp is a multiple of 64 */
        __m512i w0 = _mm512_loadu_si512((const void *)(w + k));
        for (int m = 0; m < MB; m++)
            for (int l = 0; l < NL; l++)
                a[m][l][0] = _mm512_dpbusd_epi32(
                    a[m][l][0], _mm512_loadu_si512((const void *)(xu + ((size_t)m * NL + l) * Kp + k)), w0);
    }
    for (int m = 0; m < MB; m++) {  /* y = scale_n · Σ_l s_l · (Σ_k (q_l + 128)·w − 128·Σ_k w), in double */
        double t = 0.0;
        for (int l = 0; l < NL; l++)
            t += sx[m * NL + l] * (double)(_mm512_reduce_add_epi32(_mm512_add_epi32(a[m][l][0], a[m][l][1])) - off);
        y[(size_t)m * N + n] = (float)(t * sw);
    }
}

/* x (M, K) float32 -> xu (M, L, Kp) bytes = limb + offset (128: unsigned operand; 0: signed int8), padding
   = offset, sx (M, L) limb scales. */
void lowbit_vnni_split(const float *x, uint8_t *xu, double *sx, float *xs, int M, int NL, int K, int Kp,
                       int offset, int gs) {
    for (int m = 0; m < M; m++) {
        const float *xm = x + (size_t)m * K;
        __m512 vmax = _mm512_setzero_ps();
        __mmask16 bad = 0;  /* inf or NaN inputs: their row's outputs become NaN (the scales are set to NaN) */
        for (int k = 0; k < K; k += 16) {
            __mmask16 mk = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            __m512 ax = _mm512_abs_ps(_mm512_maskz_loadu_ps(mk, xm + k));
            bad |= _mm512_cmp_ps_mask(ax, _mm512_set1_ps(3.4028235e38f), _CMP_NLE_UQ);
            vmax = _mm512_max_ps(vmax, ax);
        }
        float s = _mm512_reduce_max_ps(vmax) / 127.0f;
        if (!(s >= 1e-30f)) s = 1e-30f;
        __m512 sl[LMAX];
        for (int l = 0; l < NL; l++) {
            sl[l] = _mm512_set1_ps(s);
            sx[m * NL + l] = bad ? __builtin_nan("") : s;
            s = s / 254.0f;
        }
        const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
        const __m512i off = _mm512_set1_epi32(offset);
        __m512 gsum = _mm512_setzero_ps();
        for (int k = 0; k < Kp; k += 16) {  /* limb l rounds what limbs < l left: q = rint(r / s_l), r -= q·s_l */
            __mmask16 mk = K - k >= 16 ? (__mmask16)0xFFFF : (K > k ? (__mmask16)((1u << (K - k)) - 1) : 0);
            __m512 r = _mm512_maskz_loadu_ps(mk, xm + k);  /* padding reads as 0 */
            if (xs) {  /* per-group sums of x (groups of gs, a multiple of 16) for the zero-point term */
                gsum = _mm512_add_ps(gsum, r);
                if ((k + 16) % gs == 0) {
                    xs[(size_t)m * (Kp / gs) + k / gs] = _mm512_reduce_add_ps(gsum);
                    gsum = _mm512_setzero_ps();
                }
            }
            for (int l = 0; l < NL; l++) {
                __m512 q = _mm512_roundscale_ps(_mm512_div_ps(r, sl[l]), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
                _mm_storeu_si128((__m128i *)(xu + ((size_t)m * NL + l) * Kp + k),
                                 _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(q), off)));
                r = _mm512_fnmadd_ps(q, sl[l], r);
            }
        }
    }
}

/* y (M, N) float32 = x̂ (M, K) · (w · sw)ᵀ with x̂ the L limbs of x; w: (N, Kp) int8, off_n = 128·Σ_k w[n, k]. */
void lowbit_w8_gemm(const uint8_t *xu, const double *sx, const int8_t *w, const int32_t *off, const float *sw,
                    float *y, int M, int NL, int N, int Kp, int n_threads) {
    for (int m0 = 0; m0 < M; m0 += 4) {
        int MB = M - m0 < 4 ? M - m0 : 4;
        const uint8_t *xm = xu + (size_t)m0 * NL * Kp;
        const double *sm = sx + (size_t)m0 * NL;
        float *ym = y + (size_t)m0 * N;
        #pragma omp parallel for schedule(static) num_threads(n_threads)
        for (int t = 0; t < n_threads; t++) {
            int lo = (int)((long)N * t / n_threads), hi = (int)((long)N * (t + 1) / n_threads);
            for (int n = lo; n < hi; n++) {
                const int8_t *wn = w + (size_t)n * Kp;
                #define ROWW8(MB_) (NL == 2 ? row_kernel(xm, sm, wn, off[n], sw[n], ym, MB_, 2, Kp, N, n) \
                                        : row_kernel(xm, sm, wn, off[n], sw[n], ym, MB_, 3, Kp, N, n))
                switch (MB) {
                    case 1: ROWW8(1); break;
                    case 2: ROWW8(2); break;
                    case 3: ROWW8(3); break;
                    default: ROWW8(4); break;
                }
            }
        }
    }
}

/* 4-bit affine: codes (N, Kp/2), byte i of each 64-byte block = code i (low nibble) | code i + 64 (high nibble)
   of the block's 128 inputs ("span 128"); xq (M, NL, Kp) signed int8 limbs. Codes are the unsigned operand (0..15), limbs the
   signed one: Σ code·limb is exact in int32 per group, then scaled by the group's scale in float32.
   y[m, n] = Σ_l sx[m, l] · Σ_g s[n, g] · Σ_{k ∈ g} code[n, k] · q_l[m, k]  (the zero-point term is the caller's). */
/* One output row for MB ≤ MBMAX input rows; two instances, because arrays sized for 4 rows cost the 1-row
   case 9 % (0.53 -> 0.58 ms on 4096², measured). */
#define DEFINE_ROW_INT4(NAME, MBMAX)                                                                                       \
static inline __attribute__((always_inline)) void NAME(                                                                    \
        const int8_t *xq, const double *sx, const uint8_t *q, const float *s,                                              \
        float *y, int MB, int NL, int Kp, int N, int gs, int n) {                                                          \
    const __m512i m0f = _mm512_set1_epi8(0x0F);                                                                            \
    __m512 f[MBMAX][LMAX];                                                                                                 \
    for (int m = 0; m < MB; m++)                                                                                           \
        for (int l = 0; l < NL; l++) f[m][l] = _mm512_setzero_ps();                                                        \
    const int G = Kp / gs;                                                                                                 \
    for (int g = 0; g < G; g++) {                                                                                          \
        __m512i a[MBMAX][LMAX];  /* one chain per row and limb: two per chain cost 10 % (0.62 -> 0.55 ms, 4096²) */        \
        for (int m = 0; m < MB; m++)                                                                                       \
            for (int l = 0; l < NL; l++) a[m][l] = _mm512_setzero_si512();                                                 \
        int k = g * gs;                                                                                                    \
        const int k_end = k + gs;                                                                                          \
        for (; k + 128 <= k_end; k += 128) {  /* group sizes are multiples of 128 */                                       \
            _mm_prefetch((const char *)(q + k / 2 + PF_AHEAD), _MM_HINT_T0);  /* as in row_kernel */        \
            __m512i v = _mm512_loadu_si512((const void *)(q + k / 2));                                                     \
            __m512i c0 = _mm512_and_si512(v, m0f);                        /* codes k .. k + 63 */                          \
            __m512i c1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);  /* codes k + 64 .. k + 127 */                    \
            for (int m = 0; m < MB; m++)                                                                                   \
                for (int l = 0; l < NL; l++) {                                                                             \
                    const int8_t *xl = xq + ((size_t)m * NL + l) * Kp + k;                                                 \
                    a[m][l] = _mm512_dpbusd_epi32(a[m][l], c0, _mm512_loadu_si512((const void *)xl));                      \
                    a[m][l] = _mm512_dpbusd_epi32(a[m][l], c1, _mm512_loadu_si512((const void *)(xl + 64)));               \
                }                                                                                                          \
        }                                                                                                                  \
        __m512 sg = _mm512_set1_ps(s[g]);                                                                                  \
        for (int m = 0; m < MB; m++)                                                                                       \
            for (int l = 0; l < NL; l++)                                                                                   \
                f[m][l] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m][l]), sg, f[m][l]);                                       \
    }                                                                                                                      \
    for (int m = 0; m < MB; m++) {                                                                                         \
        double t = 0.0;                                                                                                    \
        for (int l = 0; l < NL; l++) t += sx[m * NL + l] * (double)_mm512_reduce_add_ps(f[m][l]);                          \
        y[(size_t)m * N + n] = (float)t;                                                                                   \
    }                                                                                                                      \
}
DEFINE_ROW_INT4(row_int4_2, 2)
DEFINE_ROW_INT4(row_int4_4, 4)


/* Output rows lo..hi-1 for MB input rows of NL limbs (constants after inlining: one clean loop per case). */
static inline __attribute__((always_inline)) void int4_rows(
        const int8_t *xm, const double *sm, const float *xsm, const uint8_t *q, const float *s, const float *shift,
        float *ym, int MB, int NL, int Kp, int N, int gs, int lo, int hi) {
    const int G = Kp / gs;
    for (int n = lo; n < hi; n++) {
        const uint8_t *qn = q + (size_t)n * (Kp / 2);
        const float *sn = s + (size_t)n * G;
        if (MB <= 2) row_int4_2(xm, sm, qn, sn, ym, MB, NL, Kp, N, gs, n);
        else row_int4_4(xm, sm, qn, sn, ym, MB, NL, Kp, N, gs, n);
        if (shift) {  /* − Σ_g xsum_g · zero_point_g · scale_g (vectorized: a serial double loop cost 40 %) */
            const float *zn = shift + (size_t)n * G;
            for (int m = 0; m < MB; m++) {
                __m512 c = _mm512_setzero_ps();
                for (int g = 0; g < G; g += 16) {
                    __mmask16 mk = G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1);
                    c = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, xsm + (size_t)m * G + g),
                                        _mm512_maskz_loadu_ps(mk, zn + g), c);
                }
                ym[(size_t)m * N + n] -= _mm512_reduce_add_ps(c);
            }
        }
    }
}

void lowbit_int4_gemm(const int8_t *xq, const double *sx, const float *xs, const uint8_t *q, const float *s,
                      const float *shift, float *y, int M, int NL, int N, int Kp, int gs, int n_threads) {
    const int step = NL == 2 ? 4 : 2;  /* rows per pass over the weight: as many as the 32 registers hold */
    for (int m0 = 0; m0 < M; m0 += step) {
        int MB = M - m0 < step ? M - m0 : step;
        const int8_t *xm = xq + (size_t)m0 * NL * Kp;
        const double *sm = sx + (size_t)m0 * NL;
        const float *xsm = xs + (size_t)m0 * (Kp / gs);
        float *ym = y + (size_t)m0 * N;
        #pragma omp parallel for schedule(static) num_threads(n_threads)
        for (int t = 0; t < n_threads; t++) {
            int lo = (int)((long)N * t / n_threads), hi = (int)((long)N * (t + 1) / n_threads);
            #define INT4_ROWS(MB_, NL_) int4_rows(xm, sm, xsm, q, s, shift, ym, MB_, NL_, Kp, N, gs, lo, hi)
            switch (NL * 8 + MB) {
                case 2 * 8 + 1: INT4_ROWS(1, 2); break;
                case 2 * 8 + 2: INT4_ROWS(2, 2); break;
                case 2 * 8 + 3: INT4_ROWS(3, 2); break;
                case 2 * 8 + 4: INT4_ROWS(4, 2); break;
                case 3 * 8 + 1: INT4_ROWS(1, 3); break;
                default: INT4_ROWS(2, 3); break;
            }
            #undef INT4_ROWS
        }
    }
}
"""


_SOURCE_AVX2 = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stddef.h>
#include <math.h>

int lowbit_cpu_ok(void) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("avxvnni");
}

static inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Same contract as the AVX-512 source: limb l rounds what limbs < l left (q = rint(r / s_l), r -= q·s_l). */
void lowbit_vnni_split(const float *x, uint8_t *xu, double *sx, float *xs, int M, int NL, int K, int Kp,
                       int offset, int gs) {
    for (int m = 0; m < M; m++) {
        const float *xm = x + (size_t)m * K;
        float amax = 0.0f;
        int bad = 0;
        for (int k = 0; k < K; k++) {
            float a = fabsf(xm[k]);
            bad |= !(a <= 3.4028235e38f);
            amax = a > amax ? a : amax;
        }
        float s = amax / 127.0f;
        if (!(s >= 1e-30f)) s = 1e-30f;
        float sl[3];
        for (int l = 0; l < NL; l++) { sl[l] = s; sx[m * NL + l] = bad ? NAN : s; s = s / 254.0f; }
        float gsum = 0.0f;
        for (int k = 0; k < Kp; k++) {
            float r = k < K ? xm[k] : 0.0f;
            if (xs) {
                gsum += r;
                if ((k + 1) % gs == 0) { xs[(size_t)m * (Kp / gs) + k / gs] = gsum; gsum = 0.0f; }
            }
            for (int l = 0; l < NL; l++) {
                float q = nearbyintf(r / sl[l]);
                q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
                xu[((size_t)m * NL + l) * Kp + k] = (uint8_t)((int)q + offset);
                r = fmaf(-q, sl[l], r);
            }
        }
    }
}

/* W8A16, one input row: two accumulators per limb over 64-byte steps (Kp is a multiple of 64). */
void lowbit_w8_gemm(const uint8_t *xu, const double *sx, const int8_t *w, const int32_t *off, const float *sw,
                    float *y, int M, int NL, int N, int Kp, int n_threads) {
    #pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int t = 0; t < n_threads; t++) {
        int lo = (int)((long)N * t / n_threads), hi = (int)((long)N * (t + 1) / n_threads);
        for (int n = lo; n < hi; n++) {
            const int8_t *wn = w + (size_t)n * Kp;
            for (int m = 0; m < M; m++) {
                __m256i a[3][2];
                for (int l = 0; l < NL; l++) a[l][0] = a[l][1] = _mm256_setzero_si256();
                for (int k = 0; k < Kp; k += 64) {
                    __m256i w0 = _mm256_loadu_si256((const __m256i *)(wn + k));
                    __m256i w1 = _mm256_loadu_si256((const __m256i *)(wn + k + 32));
                    for (int l = 0; l < NL; l++) {
                        const uint8_t *xl = xu + ((size_t)m * NL + l) * Kp + k;
                        a[l][0] = _mm256_dpbusd_avx_epi32(a[l][0], _mm256_loadu_si256((const __m256i *)xl), w0);
                        a[l][1] = _mm256_dpbusd_avx_epi32(a[l][1], _mm256_loadu_si256((const __m256i *)(xl + 32)), w1);
                    }
                }
                double acc = 0.0;
                for (int l = 0; l < NL; l++)
                    acc += sx[m * NL + l] * (double)(hsum_i32(_mm256_add_epi32(a[l][0], a[l][1])) - off[n]);
                y[(size_t)m * N + n] = (float)(acc * sw[n]);
            }
        }
    }
}

/* 4-bit affine, one input row, span-128 layout: bytes 0-31 of a 64-byte block hold codes k.. (low nibbles) and
   k + 64.. (high), bytes 32-63 codes k + 32.. and k + 96... Zero-point term after the row, as in AVX-512. */
void lowbit_int4_gemm(const int8_t *xq, const double *sx, const float *xs, const uint8_t *q, const float *s,
                      const float *shift, float *y, int M, int NL, int N, int Kp, int gs, int n_threads) {
    const int G = Kp / gs;
    const __m256i m0f = _mm256_set1_epi8(0x0F);
    #pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int t = 0; t < n_threads; t++) {
        int lo = (int)((long)N * t / n_threads), hi = (int)((long)N * (t + 1) / n_threads);
        for (int n = lo; n < hi; n++) {
            const uint8_t *qn = q + (size_t)n * (Kp / 2);
            const float *sn = s + (size_t)n * G;
            for (int m = 0; m < M; m++) {
                const int8_t *xm = xq + (size_t)m * NL * Kp;
                __m256 f[3];
                for (int l = 0; l < NL; l++) f[l] = _mm256_setzero_ps();
                for (int g = 0; g < G; g++) {
                    __m256i a[3][2];
                    for (int l = 0; l < NL; l++) a[l][0] = a[l][1] = _mm256_setzero_si256();
                    for (int k = g * gs; k < (g + 1) * gs; k += 128) {
                        __m256i va = _mm256_loadu_si256((const __m256i *)(qn + k / 2));
                        __m256i vb = _mm256_loadu_si256((const __m256i *)(qn + k / 2 + 32));
                        __m256i c0 = _mm256_and_si256(va, m0f), c1 = _mm256_and_si256(_mm256_srli_epi16(va, 4), m0f);
                        __m256i c2 = _mm256_and_si256(vb, m0f), c3 = _mm256_and_si256(_mm256_srli_epi16(vb, 4), m0f);
                        for (int l = 0; l < NL; l++) {
                            const int8_t *xl = xm + (size_t)l * Kp + k;
                            a[l][0] = _mm256_dpbusd_avx_epi32(a[l][0], c0, _mm256_loadu_si256((const __m256i *)xl));
                            a[l][1] = _mm256_dpbusd_avx_epi32(a[l][1], c1, _mm256_loadu_si256((const __m256i *)(xl + 64)));
                            a[l][0] = _mm256_dpbusd_avx_epi32(a[l][0], c2, _mm256_loadu_si256((const __m256i *)(xl + 32)));
                            a[l][1] = _mm256_dpbusd_avx_epi32(a[l][1], c3, _mm256_loadu_si256((const __m256i *)(xl + 96)));
                        }
                    }
                    __m256 sg = _mm256_set1_ps(sn[g]);
                    for (int l = 0; l < NL; l++)
                        f[l] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a[l][0], a[l][1])), sg, f[l]);
                }
                double acc = 0.0;
                for (int l = 0; l < NL; l++) acc += sx[m * NL + l] * (double)hsum_ps(f[l]);
                if (shift) {
                    const float *zn = shift + (size_t)n * G, *xsm = xs + (size_t)m * G;
                    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};  /* four chains: one serial chain cost 40 % (AVX-512) */
                    int g = 0;
                    for (; g + 4 <= G; g += 4)
                        for (int j = 0; j < 4; j++) c[j] += xsm[g + j] * zn[g + j];
                    for (; g < G; g++) c[0] += xsm[g] * zn[g];
                    acc -= (double)((c[0] + c[1]) + (c[2] + c[3]));
                }
                y[(size_t)m * N + n] = (float)acc;
            }
        }
    }
}
"""

_DRIVERS = r"""
#include <stdlib.h>

/* One call from Python per matmul: the limbs go to malloc'd scratch, then the GEMM (saves ~10 µs of torch
   allocations and a second ctypes call per layer). Return 0, or -1 when out of memory. */
int lowbit_w8_linear(const float *x, const int8_t *w, const int32_t *off, const float *sw, float *y,
                     int M, int NL, int K, int N, int Kp, int n_threads) {
    if (M <= 0) return 0;
    uint8_t *xu = malloc((size_t)M * NL * Kp);
    double *sx = malloc(sizeof(double) * (size_t)M * NL);
    if (!xu || !sx) { free(xu); free(sx); return -1; }
    lowbit_vnni_split(x, xu, sx, 0, M, NL, K, Kp, 128, 16);
    lowbit_w8_gemm(xu, sx, w, off, sw, y, M, NL, N, Kp, n_threads);
    free(xu); free(sx);
    return 0;
}

int lowbit_int4_linear(const float *x, const uint8_t *q, const float *s, const float *shift, float *y,
                       int M, int NL, int K, int N, int Kp, int gs, int n_threads) {
    if (M <= 0) return 0;
    int8_t *xq = malloc((size_t)M * NL * Kp);
    double *sx = malloc(sizeof(double) * (size_t)M * NL);
    float *xs = malloc(sizeof(float) * (size_t)M * (Kp / gs));
    if (!xq || !sx || !xs) { free(xq); free(sx); free(xs); return -1; }
    lowbit_vnni_split(x, (uint8_t *)xq, sx, xs, M, NL, K, Kp, 0, gs);
    lowbit_int4_gemm(xq, sx, xs, q, s, shift, y, M, NL, N, Kp, gs, n_threads);
    free(xq); free(sx); free(xs);
    return 0;
}
"""


_VARIANTS = {"avx512": (_SOURCE + _DRIVERS, ("-mavx512f", "-mavx512bw", "-mavx512vnni")),
             "avx2": (_SOURCE_AVX2 + _DRIVERS, ("-mavx2", "-mfma", "-mavxvnni"))}


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    """The AVX-512 VNNI kernels, else the AVX-VNNI (256-bit) ones; ``LOWBIT_CPU_ISA=avx2`` forces the latter."""
    return cpu_native.load_variant("vnni", _VARIANTS, {
        "lowbit_vnni_split": (None, 4, 6), "lowbit_int4_gemm": (None, 7, 6), "lowbit_w8_gemm": (None, 6, 5),
        "lowbit_w8_linear": (ctypes.c_int, 5, 6), "lowbit_int4_linear": (ctypes.c_int, 5, 7)})


def isa() -> str | None:
    """Which variant runs here (``"avx512"``: AVX-512 VNNI; ``"avx2"``: AVX-VNNI), or None."""
    lib = _lib()
    return None if lib is None else lib.lowbit_isa


def available() -> bool:
    """Whether the compiled kernel runs here (AVX-512 VNNI and a working C compiler); cached per process."""
    return _lib() is not None


@dataclass(frozen=True, eq=False)
class W8Weight:
    """``qdata (N, Kp) int8`` (K zero-padded to a multiple of 64: the stored tensor itself when K already is),
    ``scale (N,)`` float32, ``offset (N,)`` int32 = ``128·Σ_k qdata[n, k]``."""

    qdata: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qdata.shape[0]


def pack_w8(qdata: torch.Tensor, scale: torch.Tensor) -> W8Weight:
    """Per-row (or per-tensor) int8 weight ``W = qdata · scale[:, None]`` in the kernel layout.

    Raises:
        ValueError: ``qdata`` is not 2-D int8, or ``scale`` has neither 1 nor ``out_features`` values.
    """
    if qdata.dtype != torch.int8 or qdata.dim() != 2:
        raise ValueError(f"qdata must be 2-D int8, got {qdata.dtype} with shape {tuple(qdata.shape)}")
    N, K = qdata.shape
    s = scale.reshape(-1).to(torch.float32)
    if s.numel() not in (1, N):
        raise ValueError(f"scale must hold 1 or {N} values, got {s.numel()}")
    if K > 130000:
        raise ValueError(f"in_features={K} could overflow the int32 sums (at most 130000)")
    Kp = -(-K // 64) * 64
    q = qdata if Kp == K and qdata.is_contiguous() else torch.nn.functional.pad(qdata, (0, Kp - K)).contiguous()
    return W8Weight(q, s.expand(N).contiguous(), (128 * q.sum(1, dtype=torch.int64)).to(torch.int32), K)


def split_limbs(x: torch.Tensor, padded_in: int, signed: bool = False, n_limbs: int = LIMBS,
                group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``x (M, K)`` -> (limbs ``(M, n_limbs, padded_in)``, ``s (M, n_limbs)`` float64 limb scales, ``xsum``).

    Limbs are uint8 ``q + 128`` (the unsigned operand of ``vpdpbusd``; padding 128), or int8 ``q`` with
    ``signed=True`` (padding 0). ``xsum (M, padded_in / group_size)`` float32: the inputs' sum over each group
    (``group_size`` a multiple of 16 dividing ``padded_in``), or None for ``group_size=0``.

    Raises:
        RuntimeError: the kernel is not available here (check :func:`available` first).
    """
    lib = _require()
    x2 = x.to(torch.float32).contiguous()
    M, K = x2.shape
    if n_limbs not in (2, 3):
        raise ValueError(f"n_limbs must be 2 or 3, got {n_limbs!r}")
    if padded_in % 16 or padded_in < K or (group_size and (group_size % 16 or padded_in % group_size)):
        raise ValueError(f"padded_in={padded_in} must be a multiple of 16 >= {K}, divided by group_size={group_size} "
                         "(a multiple of 16, or 0)")
    u = torch.empty(M, n_limbs, padded_in, dtype=torch.uint8)
    s = torch.empty(M, n_limbs, dtype=torch.float64)
    xs = torch.empty(M, padded_in // group_size, dtype=torch.float32) if group_size else None
    lib.lowbit_vnni_split(x2.data_ptr(), u.data_ptr(), s.data_ptr(), 0 if xs is None else xs.data_ptr(), M, n_limbs, K,
                          padded_in, 0 if signed else 128, group_size or 16)
    return (u.view(torch.int8) if signed else u), s, xs


def _require() -> ctypes.CDLL:
    lib = _lib()
    if lib is None:
        raise RuntimeError("the int8 VNNI CPU kernel is not available (needs AVX-512 VNNI and a C compiler)")
    return lib


def w8_linear(x: torch.Tensor, w: W8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., K) @ (qdata · scale)ᵀ (+ bias)``; output in ``x``'s dtype.

    Raises:
        RuntimeError: the kernel is not available here (check :func:`available` first).
    """
    lib = _require()
    x2 = cpu_native.as_rows(x, torch.float32)
    M, K, N = x2.shape[0], x2.shape[1], w.out_features
    if K != w.in_features:
        raise ValueError(f"x has {K} features, the weight {w.in_features}")
    y = torch.empty(M, N, dtype=torch.float32)
    if lib.lowbit_w8_linear(x2.data_ptr(), w.qdata.data_ptr(), w.offset.data_ptr(), w.scale.data_ptr(), y.data_ptr(),
                            M, limbs_for(x.dtype), K, N, w.qdata.shape[1], torch.get_num_threads()):
        raise MemoryError("no memory for the input limbs")
    if bias is not None:
        y += bias.to(torch.float32)
    return cpu_native.like_input(y, x)


def int4_available() -> bool:
    """Whether the 4-bit affine VNNI kernel runs here (the same library as :func:`available`)."""
    return available()


def pack_int4(q) -> "cpu_lut4.Lut4Weight":  # type: ignore[no-untyped-def]  # noqa: F821
    """4-bit ``IntAffine`` in this kernel's layout (:func:`lowbit.ops.cpu_lut4.pack_affine4` with ``span=128``).

    Raises:
        ValueError: not 4-bit affine, or a group size that is not a multiple of 128.
    """
    from lowbit.ops import cpu_lut4

    return cpu_lut4.pack_affine4(q, span=128)


def int4_linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``x (..., K) @ Wᵀ (+ bias)`` for a 4-bit affine weight from :func:`pack_int4`; output in ``x``'s dtype.

    ``x`` is split into signed int8 limbs (three for float32: error ≤ max|x|/(127·254²·2); two for bf16/fp16);
    each group's ``Σ code · limb`` is exact, then the group scales and the zero-point term
    ``Σ_g xsum_g · zero_point·scale`` in float32.

    Raises:
        RuntimeError: the kernel is not available here; ValueError: a weight not in the span-128 layout or of
        another width; MemoryError: no memory for the limbs.
    """
    lib = _require()
    if w.span != 128:
        raise ValueError(f"int4_linear needs the span-128 layout (pack_int4), got span {w.span}")
    if x.dim() == 0 or x.shape[-1] != w.in_features:  # before the act-order gather, which would fail unclearly
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} features, the weight {w.in_features}")
    x2 = cpu_native.as_rows(x, torch.float32)
    if w.perm is not None:
        x2 = x2.index_select(1, w.perm.long())
    M, N = x2.shape[0], w.out_features
    y = torch.empty(M, N, dtype=torch.float32)
    if lib.lowbit_int4_linear(x2.data_ptr(), w.codes.data_ptr(), w.scale.data_ptr(),
                              0 if w.shift is None else w.shift.data_ptr(), y.data_ptr(), M, limbs_for(x.dtype),
                              x2.shape[1], N, w.padded_in, w.group_size, torch.get_num_threads()):
        raise MemoryError("no memory for the input limbs")
    if bias is not None:
        y += bias.to(torch.float32)
    return cpu_native.like_input(y, x)
