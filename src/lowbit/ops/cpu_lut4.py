"""CPU kernels for 4-bit weights through a 16-entry lookup table: NF4/FP4 and 4-bit IntAffine in float32, and
NF4/FP4 (any 16-entry code) with bf16 inputs on AVX512-BF16.

``y[m, n] = Σ_g scale[n, g] · Σ_{k ∈ g} x[m, k] · lut[code[n, k]]  −  Σ_g xsum[m, g] · shift[n, g]``

- NF4 / FP4 (``Codebook``): ``lut`` = the float32 code, ``scale`` = the first-level absmax per block, no shift.
- IntAffine 4-bit: ``lut = [0, 1, …, 15]``, ``scale`` per group and ``shift = zero_point · scale`` (applied with
  the per-group input sums ``xsum``, a ``(M, G) @ (G, N)`` matmul done by torch). 4-bit affine with group sizes
  that are multiples of 128 usually runs :mod:`lowbit.ops.cpu_vnni` instead (faster); this kernel takes the rest.

Why hand-written: ATen has no lookup-table matmul (NF4 had no CPU fast path), and its int4 packed kernel runs a
scalar loop for float32 inputs. This kernel keeps activations, code values and accumulation in float32 (AVX-512:
``vpermps`` looks the 16 code values up in one register; four independent FMA chains per input row), so it
matches the float32 reference to float32 rounding, and bf16 inputs are widened exactly to float32.

The C sources below are compiled on first use by :mod:`lowbit.ops.cpu_native`: the AVX-512 kernel, else an AVX2
one (8-lane permutes of both table halves and a blend: about 3× the lookup work, for laptops without AVX-512). No
compiler or neither instruction set: :func:`available` is ``False`` (logged once) and callers keep their other paths.

Layout (:class:`Lut4Weight`, ``span=32``): ``codes (N, Kp/2) uint8`` where, for each chunk of 32 inputs, byte ``j``
holds the code of input ``j`` in its low nibble and of input ``j + 16`` in its high nibble; ``Kp`` = K padded to a
whole group. Kernel reads ``x (M, Kp) float32`` (zero-padded), one output row per loop step, rows split over
threads. ``span=128`` is the VNNI kernel's layout of the same codes (see :func:`pack_lut4`).

**bf16 inputs** (``span=64``, AVX512-BF16; :func:`bf16_available`; codebooks with groups that are multiples of 64):
what it rounds, and where. For bf16 inputs the reference op dequantizes ``W = bf16(code · absmax)`` (the product in
float32, rounded to nearest-even) and multiplies in bf16 with float32 accumulation. This kernel builds, per output
row and group, the 16-entry table ``bf16(lut[c] · scale)`` the same way (``vmulps`` then ``vcvtne2ps2bf16``: the
same bf16 weights bit for bit, tested with one-hot inputs), looks 32 weights up per ``vpermw`` and accumulates
``x · w`` with ``vdpbf16ps``: each bf16 × bf16 product is exact in float32, the sums are float32 (two accumulators
of 16 lanes per output row, reduced at the end), bias is added in float32, and the output is rounded once to the
input's dtype. Measured (tests/ops/test_cpu_lut4_bf16.py, random data, K 192 … 1536): float32 output against the
float64 product of the same bf16 inputs and weights 3e-8 … 1.2e-7 relative; bf16 output against the reference
op's ≤ 1.5e-3 (bf16 output rounding: the two round differently accumulated float32 sums). ``vdpbf16ps`` treats
bf16 denormals (below 1.2e-38) as zero and flushes denormal results, whatever MXCSR says; NaN and ±inf propagate
as in the reference (inf · 0 = NaN for the zero code). fp16 inputs are not rounded to bf16: they stay on the
float32 kernel. Layout: per 128 inputs 64 bytes, nibble ``j`` of 16-bit word ``w`` holds the code of input
``32j + w`` (a last 64 inputs: byte ``j`` holds inputs ``j`` and ``j + 32``). One input row: four output rows
per step; more input rows (up to :data:`MAX_ROWS`, four per pass): one output row per step.
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

__all__ = ["Lut4Weight", "available", "bf16_available", "isa", "pack_lut4", "pack_codebook", "pack_affine4", "lut4_linear", "MAX_ROWS"]

SPANS = (32, 64, 128)  # layouts: this float32 kernel, the bf16 kernel, cpu_vnni.int4_linear
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

_SOURCE_BF16 = _C_PASSES + r"""
int lowbit_cpu_ok(void) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512bf16");
}

/* [bf16(lut·s0) | bf16(lut·s1)]: 16 words each, the products in float32, rounded to nearest-even (vcvtne2ps2bf16) */
static inline __attribute__((always_inline)) __m512i tables2(__m512 lut, float s0, float s1) {
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(lut, _mm512_set1_ps(s1)), _mm512_mul_ps(lut, _mm512_set1_ps(s0)));
}
#define DOT(acc, w, xp) acc = _mm512_dpbf16_ps(acc, (__m512bh)(w), (__m512bh)_mm512_loadu_si512((const void *)(xp)))

/* MB input rows x R output rows (constants after inlining). Per 128 codes (64 bytes, 32 words; nibble j of word w
   is code 32j + w): four vpermw lookups of 32 bf16 weights in a table held twice (vpermw reads index bits 0-4; bit 4
   is the next nibble's bit 0), four vdpbf16ps per input row. One vcvtne2ps2bf16 builds both halves' tables, and
   vshufi64x2 doubles each (measured, one thread, 256 x 4096: a conversion per table 0.058 ms, per two 0.053).
   The rows of the next block are prefetched. A last 64 codes (32 bytes) go through vpmovzxbw. */
static inline __attribute__((always_inline)) void bf16_rows(
        const uint16_t *x, const uint8_t *q, const float *s, __m512 lut, float *y,
        const int MB, const int R, int Kp, int N, int gs, int n) {
    __m512 a[4][4][2];
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) a[m][r][0] = a[m][r][1] = _mm512_setzero_ps();
    const size_t Kb = (size_t)Kp / 2, G = (size_t)(Kp / gs);
    const int halves = gs / 64;
    int g = 0, h = 0;  /* group of the current 64 codes, and which 64 of that group */
    int k = 0;
    for (; k + 128 <= Kp; k += 128) {
        const int g0 = g;
        if (++h == halves) { h = 0; g++; }
        const int g1 = g;
        if (++h == halves) { h = 0; g++; }
        for (int r = 0; r < R; r++) {
            const uint8_t *qr = q + r * Kb + k / 2;
            _mm_prefetch((const char *)(qr + R * Kb), _MM_HINT_T0);
            const __m512i p = tables2(lut, s[r * G + g0], s[r * G + g1]);
            const __m512i t0 = _mm512_shuffle_i64x2(p, p, 0x44), t1 = _mm512_shuffle_i64x2(p, p, 0xEE);
            const __m512i v = _mm512_loadu_si512((const void *)qr);
            const __m512i w0 = _mm512_permutexvar_epi16(v, t0);
            const __m512i w1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), t0);
            const __m512i w2 = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), t1);
            const __m512i w3 = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), t1);
            for (int m = 0; m < MB; m++) {
                const uint16_t *xk = x + (size_t)m * Kp + k;
                DOT(a[m][r][0], w0, xk);
                DOT(a[m][r][1], w1, xk + 32);
                DOT(a[m][r][0], w2, xk + 64);
                DOT(a[m][r][1], w3, xk + 96);
            }
        }
    }
    if (k < Kp) {  /* Kp is a multiple of 64: byte j of the last 32 holds codes j and j + 32 */
        for (int r = 0; r < R; r++) {
            const __m512i t = tables2(lut, s[r * G + g], s[r * G + g]);
            const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(q + r * Kb + k / 2)));
            const __m512i w0 = _mm512_permutexvar_epi16(b, t), w1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), t);
            for (int m = 0; m < MB; m++) {
                DOT(a[m][r][0], w0, x + (size_t)m * Kp + k);
                DOT(a[m][r][1], w1, x + (size_t)m * Kp + k + 32);
            }
        }
    }
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++)
            y[(size_t)m * N + n + r] = _mm512_reduce_add_ps(_mm512_add_ps(a[m][r][0], a[m][r][1]));
}

/* One input row: four output rows per step (eight independent accumulators); more input rows: one output row. */
void lowbit_lut4_bf16_gemm(const uint16_t *x, const uint8_t *q, const float *s, const float *lut16, float *y,
                           int M, int N, int Kp, int gs, int n_threads) {
    const __m512 lut = _mm512_loadu_ps(lut16);
    const size_t Kb = (size_t)Kp / 2, G = (size_t)(Kp / gs);
    #define BF16_ROWS(MB_) {                                                                              \
        const uint16_t *xm = x + (size_t)m0 * Kp;                                                         \
        float *ym = y + (size_t)m0 * N;                                                                   \
        int n = lo;                                                                                       \
        if (MB_ == 1)                                                                                     \
            for (; n + 4 <= hi; n += 4) bf16_rows(xm, q + n * Kb, s + n * G, lut, ym, 1, 4, Kp, N, gs, n); \
        for (; n < hi; n++) bf16_rows(xm, q + n * Kb, s + n * G, lut, ym, MB_, 1, Kp, N, gs, n);          \
    }
    LOWBIT_FOR_PASSES(M, N, n_threads, BF16_ROWS)
    #undef BF16_ROWS
}
"""



_VARIANTS_BF16 = {"avx512": (_SOURCE_BF16, ("-mavx512f", "-mavx512bw", "-mavx512bf16"))}


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    """The AVX-512 kernel, else the AVX2 one (``LOWBIT_CPU_ISA=avx2`` forces the latter: tests)."""
    return cpu_native.load_variant("lut4", _VARIANTS, {"lowbit_lut4_gemm": (None, 5, 5)})


@lru_cache(maxsize=1)
def _lib_bf16() -> ctypes.CDLL | None:
    """The AVX512-BF16 kernel for bf16 inputs, or None (no compiler or no avx512_bf16: logged once by
    :mod:`lowbit.ops.cpu_native`; ``LOWBIT_CPU_ISA`` forcing a variant it does not have, e.g. ``avx2``)."""
    forced = os.environ.get("LOWBIT_CPU_ISA")
    if forced is not None and forced not in _VARIANTS_BF16 and forced in _VARIANTS:
        logger.info("LOWBIT_CPU_ISA=%s: the bf16 lut4 kernel (avx512 only) is not used", forced)
        return None
    return cpu_native.load_variant("lut4_bf16", _VARIANTS_BF16, {"lowbit_lut4_bf16_gemm": (None, 5, 5)})


def isa() -> str | None:
    """Which variant runs here (``"avx512"``, ``"avx2"``), or None."""
    lib = _lib()
    return None if lib is None else lib.lowbit_isa


def available() -> bool:
    """Whether the compiled kernel loads here (AVX-512 CPU and a working C compiler); cached per process."""
    return _lib() is not None


def bf16_available() -> bool:
    """Whether the bf16-input kernel (``span=64`` layout) loads here (AVX512-BF16 and a C compiler); cached."""
    return _lib_bf16() is not None


@dataclass(frozen=True, eq=False)
class Lut4Weight:
    """The kernel layout (module docstring). ``shift (N, G)`` float32 or None; ``perm (K,)`` for act-order."""

    codes: torch.Tensor
    scale: torch.Tensor
    lut: torch.Tensor
    shift: torch.Tensor | None
    group_size: int
    in_features: int
    padded_in: int
    perm: torch.Tensor | None
    span: int = 32

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]


def pack_lut4(codes: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor, group_size: int,
              shift: torch.Tensor | None = None, perm: torch.Tensor | None = None, span: int = 32) -> Lut4Weight:
    """Build the kernel layout from codes ``(N, K)`` in [0, 16), ``scale (N, ceil(K/group_size))``.

    ``span=32``: this kernel's layout. ``span=64``: the bf16 kernel's (module docstring; group sizes multiple of
    64). ``span=128``: byte ``i`` of each 64-byte block holds codes ``i`` and ``i + 64`` of its 128 inputs, the
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
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, Kp - K)).reshape(N, Kp // span, 2, span // 2)
    if int(c.max()) > 15:
        raise ValueError("codes must be in [0, 16)")
    packed = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(N, Kp // 2)
    if span == 64:  # pairs of 32-byte halves interleaved bytewise: nibble j of 16-bit word w = code 32j + w
        n2 = Kp // 128 * 64
        full = packed[:, :n2].reshape(N, -1, 2, 32).transpose(2, 3).reshape(N, n2)
        packed = torch.cat([full, packed[:, n2:]], 1)
    packed = packed.contiguous()
    return Lut4Weight(packed, scale.to(torch.float32).contiguous(), lut.to(torch.float32).contiguous(),
                      None if shift is None else shift.to(torch.float32).contiguous(), group_size, K, Kp, perm, span)


def pack_codebook(q, span: int = 32) -> Lut4Weight:  # type: ignore[no-untyped-def]
    """NF4 / FP4 (``Codebook`` with 4-bit codes, double quantization or not), for the float32 kernel
    (``span=32``) or the bf16 one (``span=64``).

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

    ``span=32``: the float32 kernel (bf16/fp16 inputs widened exactly). ``span=64``: the bf16 kernel; inputs are
    rounded to bf16 (exact for bf16 inputs; what ``float32_compute="bfloat16"`` asks for, otherwise). Bias is added
    in float32 before the output is cast.

    Raises:
        RuntimeError: that kernel is not available here (check :func:`available` / :func:`bf16_available`).
        ValueError: another layout (``span=128`` is :func:`lowbit.ops.cpu_vnni.int4_linear`'s), or ``x`` has not
            ``in_features`` features (the kernel would read past the input).
    """
    if w.span not in (32, 64):
        raise ValueError(f"lut4_linear takes the span-32 or span-64 layout, got span {w.span}")
    if x.dim() == 0 or x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} features, the weight {w.in_features}")
    lib = _lib() if w.span == 32 else _lib_bf16()
    if lib is None:
        raise RuntimeError(f"the {'float32' if w.span == 32 else 'bf16'} lut4 CPU kernel is not available here "
                           "(needs a C compiler and AVX-512 / AVX2, or AVX512-BF16 for the bf16 one)")
    x2 = cpu_native.as_rows(x, torch.float32 if w.span == 32 else torch.bfloat16)
    if w.perm is not None:
        x2 = x2.index_select(1, w.perm.long())
    if w.padded_in != w.in_features:
        x2 = torch.nn.functional.pad(x2, (0, w.padded_in - w.in_features))
    x2 = x2.contiguous()
    M, N = x2.shape[0], w.out_features
    y = torch.empty(M, N, dtype=torch.float32)
    fn = lib.lowbit_lut4_gemm if w.span == 32 else lib.lowbit_lut4_bf16_gemm
    fn(x2.data_ptr(), w.codes.data_ptr(), w.scale.data_ptr(), w.lut.data_ptr(), y.data_ptr(), M, N, w.padded_in,
       w.group_size, torch.get_num_threads())
    if w.shift is not None:
        y -= x2.float().reshape(M, -1, w.group_size).sum(-1) @ w.shift.t()
    if bias is not None:
        y += bias.to(torch.float32)
    if out_dtype is not None and out_dtype != x.dtype:
        return y.to(out_dtype).reshape(*x.shape[:-1], N)
    return cpu_native.like_input(y, x)
