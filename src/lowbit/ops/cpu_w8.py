"""Weight-only int8 (W8A16) on the CPU's int8 dot-product instructions (AVX-512 VNNI), with float inputs.

The weight is ``W = qdata · scale[:, None]`` (``Int8Rowwise`` without activation quantization). Its reference
multiplies float inputs by the dequantized weight; ATen's int8 packed kernel does that at about a third of the
speed of torch's dynamic int8 (which quantizes the inputs to 8 bits: another format). Here each input row is
split exactly-enough into three int8 limbs::

    x ≈ s1·q1 + s2·q2 + s3·q3,   s1 = max|x|/127,  s2 = s1/254,  s3 = s2/254,   q_l ∈ [-127, 127]

(each limb rounds what the previous ones left, so ``|x − x̂| ≤ s3/2 = max|x| / (127·254²·2) ≈ 6.1e-8·max|x|``,
below float32's own rounding of values near ``max|x|``), and ``x̂ · qdataᵀ`` is three exact int8 × int8 → int32
dot products per output (``vpdpbusd``: 64 multiply-adds per instruction; the unsigned operand is ``q + 128``
and ``128·Σ_k qdata[n, k]`` is subtracted). The kernel reads the int8 weight once for all limbs, so it runs at
the speed of the weight read — W8A8's speed with float-input accuracy. Tested against the float64 product.

Compiled on first use by :mod:`lowbit.ops.cpu_native`; unavailable (``available() == False``) without a C
compiler or without AVX-512 VNNI.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache

import torch

from lowbit.ops import cpu_native

__all__ = ["W8Weight", "available", "pack_w8", "w8_linear", "split_limbs", "LIMBS", "MAX_ROWS"]

LIMBS = 3
MAX_ROWS = 16  # more input rows re-read the weight per 4 rows; ATen's kernel takes over there

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stddef.h>

int lowbit_cpu_ok(void) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vnni");
}

#define L 3
/* MB rows (1..4) x L limbs: two accumulators each (k and k + 64), 64 unsigned x signed byte products each. */
static inline __attribute__((always_inline)) void row_kernel(
        const uint8_t *xu, const double *sx, const int8_t *w, double off, double sw, float *y,
        int MB, int Kp, int N, int n) {
    __m512i a[4][L][2];
    for (int m = 0; m < MB; m++)
        for (int l = 0; l < L; l++) a[m][l][0] = a[m][l][1] = _mm512_setzero_si512();
    int k = 0;
    for (; k + 128 <= Kp; k += 128) {
        _mm_prefetch((const char *)(w + k + 1024), _MM_HINT_T0);  /* measured: 0.67 -> 0.58 ms on 4096² */
        _mm_prefetch((const char *)(w + k + 1024 + 64), _MM_HINT_T0);
        __m512i w0 = _mm512_loadu_si512((const void *)(w + k));
        __m512i w1 = _mm512_loadu_si512((const void *)(w + k + 64));
        for (int m = 0; m < MB; m++)
            for (int l = 0; l < L; l++) {
                const uint8_t *xl = xu + ((size_t)m * L + l) * Kp + k;
                a[m][l][0] = _mm512_dpbusd_epi32(a[m][l][0], _mm512_loadu_si512((const void *)xl), w0);
                a[m][l][1] = _mm512_dpbusd_epi32(a[m][l][1], _mm512_loadu_si512((const void *)(xl + 64)), w1);
            }
    }
    if (k < Kp) {  /* Kp is a multiple of 64 */
        __m512i w0 = _mm512_loadu_si512((const void *)(w + k));
        for (int m = 0; m < MB; m++)
            for (int l = 0; l < L; l++)
                a[m][l][0] = _mm512_dpbusd_epi32(
                    a[m][l][0], _mm512_loadu_si512((const void *)(xu + ((size_t)m * L + l) * Kp + k)), w0);
    }
    for (int m = 0; m < MB; m++) {  /* y = scale_n · Σ_l s_l · (Σ_k (q_l + 128)·w − 128·Σ_k w), in double */
        double t = 0.0;
        for (int l = 0; l < L; l++)
            t += sx[m * L + l] * ((double)_mm512_reduce_add_epi32(_mm512_add_epi32(a[m][l][0], a[m][l][1])) - off);
        y[(size_t)m * N + n] = (float)(t * sw);
    }
}

/* x (M, K) float32 -> xu (M, L, Kp) uint8 = limb + 128 (padding: 128), sx (M, L) limb scales. */
void lowbit_w8_split(const float *x, uint8_t *xu, double *sx, int M, int K, int Kp) {
    for (int m = 0; m < M; m++) {
        const float *xm = x + (size_t)m * K;
        float amax = 0.0f;
        for (int k = 0; k < K; k++) { float v = xm[k] < 0 ? -xm[k] : xm[k]; amax = v > amax ? v : amax; }
        float s = amax / 127.0f;
        if (!(s >= 1e-30f)) s = 1e-30f;  /* also catches NaN */
        float sl[L];
        for (int l = 0; l < L; l++) { sl[l] = s; sx[m * L + l] = s; s = s / 254.0f; }
        for (int k = 0; k < K; k++) {
            float r = xm[k];
            for (int l = 0; l < L; l++) {
                float q = __builtin_nearbyintf(r / sl[l]);
                q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
                xu[((size_t)m * L + l) * Kp + k] = (uint8_t)(int)(q + 128.0f);
                r = r - q * sl[l];
            }
        }
        for (int l = 0; l < L; l++)
            for (int k = K; k < Kp; k++) xu[((size_t)m * L + l) * Kp + k] = 128;
    }
}

/* y (M, N) float32 = x̂ (M, K) · (w · sw)ᵀ with x̂ the L limbs of x; w: (N, Kp) int8, off_n = 128·Σ_k w[n, k]. */
void lowbit_w8_gemm(const uint8_t *xu, const double *sx, const int8_t *w, const double *off, const float *sw,
                    float *y, int M, int N, int Kp, int n_threads) {
    for (int m0 = 0; m0 < M; m0 += 4) {
        int MB = M - m0 < 4 ? M - m0 : 4;
        const uint8_t *xm = xu + (size_t)m0 * L * Kp;
        const double *sm = sx + (size_t)m0 * L;
        float *ym = y + (size_t)m0 * N;
        #pragma omp parallel for schedule(static) num_threads(n_threads)
        for (int t = 0; t < n_threads; t++) {
            int lo = (int)((long)N * t / n_threads), hi = (int)((long)N * (t + 1) / n_threads);
            for (int n = lo; n < hi; n++) {
                const int8_t *wn = w + (size_t)n * Kp;
                switch (MB) {
                    case 1: row_kernel(xm, sm, wn, off[n], sw[n], ym, 1, Kp, N, n); break;
                    case 2: row_kernel(xm, sm, wn, off[n], sw[n], ym, 2, Kp, N, n); break;
                    case 3: row_kernel(xm, sm, wn, off[n], sw[n], ym, 3, Kp, N, n); break;
                    default: row_kernel(xm, sm, wn, off[n], sw[n], ym, 4, Kp, N, n); break;
                }
            }
        }
    }
}
"""


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    lib = cpu_native.load("w8_vnni", _SOURCE, ("-mavx512f", "-mavx512bw", "-mavx512vnni"))
    if lib is not None:
        lib.lowbit_w8_split.restype = None
        lib.lowbit_w8_split.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3
        lib.lowbit_w8_gemm.restype = None
        lib.lowbit_w8_gemm.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 4
    return lib


def available() -> bool:
    """Whether the compiled kernel runs here (AVX-512 VNNI and a working C compiler); cached per process."""
    return _lib() is not None


@dataclass(frozen=True, eq=False)
class W8Weight:
    """``qdata (N, Kp) int8`` (K zero-padded to a multiple of 64), ``scale (N,)`` float32, ``offset (N,)`` =
    ``128·Σ_k qdata[n, k]`` as float64."""

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
    Kp = -(-K // 64) * 64
    q = torch.nn.functional.pad(qdata, (0, Kp - K)).contiguous()
    return W8Weight(q, s.expand(N).contiguous(), 128.0 * q.sum(1, dtype=torch.float64), K)


def split_limbs(x: torch.Tensor, padded_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (M, K)`` -> (``u (M, LIMBS, padded_in)`` uint8 = limb + 128, ``s (M, LIMBS)`` float64 limb scales).

    Raises:
        RuntimeError: the kernel is not available here (check :func:`available` first).
    """
    lib = _require()
    x2 = x.to(torch.float32).contiguous()
    M, K = x2.shape
    u = torch.empty(M, LIMBS, padded_in, dtype=torch.uint8)
    s = torch.empty(M, LIMBS, dtype=torch.float64)
    lib.lowbit_w8_split(x2.data_ptr(), u.data_ptr(), s.data_ptr(), M, K, padded_in)
    return u, s


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
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    u, s = split_limbs(x2, w.qdata.shape[1])
    M, N = x2.shape[0], w.out_features
    y = torch.empty(M, N, dtype=torch.float32)
    lib.lowbit_w8_gemm(u.data_ptr(), s.data_ptr(), w.qdata.data_ptr(), w.offset.data_ptr(), w.scale.data_ptr(),
                       y.data_ptr(), M, N, w.qdata.shape[1], torch.get_num_threads())
    if bias is not None:
        y += bias.to(torch.float32)
    return y.to(x.dtype).reshape(*lead, N)
