"""Ternary GGML blocks TQ1_0 (1.6875 bpw, base-3 packed) and TQ2_0 (2.0625 bpw) for BitNet b1.58 weights.

Reproduces ``quantize_row_tq1_0_ref`` / ``quantize_row_tq2_0_ref`` (llama.cpp PR #8151; BitNet b1.58,
arXiv:2402.17764): ``d = max|x|`` per 256 weights, trits ``t = round(x/d) + 1 ∈ {0, 1, 2}``. The importance
matrix is ignored, as in llama.cpp.
"""

from __future__ import annotations

import numpy as np

from lowbit.formats.ggml.jit import kernel, roundf
from lowbit.formats.ggml.numerics import F32, f16_from_bytes, to_f16_bytes

@kernel
def _trits(xb, t):
    """``d = max|x|`` of one 256-block and its trits ``t = roundf(x/d) + 1`` (written into ``t``)."""
    amax = np.float32(0.0)
    for j in range(256):
        amax = max(amax, abs(xb[j]))
    idb = np.float32(1.0) / amax if amax != 0 else np.float32(0.0)
    for j in range(256):
        t[j] = roundf(xb[j] * idb) + 1
    return amax


@kernel
def _tq1_0_kernel(x, d, out):
    """``quantize_row_tq1_0_ref``: 5 trits per byte (base 3, scaled to a byte) for elements 0..239, 4 for the
    last 16; byte ``m`` of a group holds elements ``m + k·width``."""
    t = np.empty(256, dtype=np.int64)
    for b in range(x.shape[0]):
        d[b] = _trits(x[b], t)
        o = out[b]
        for base, width, pos, n in ((0, 32, 0, 5), (160, 16, 32, 5), (240, 4, 48, 4)):
            for m in range(width):
                q = 0
                for k in range(n):
                    q = q * 3 + t[base + m + k * width]
                if n == 4:
                    q *= 3
                o[pos + m] = np.uint8((q * 256 + 242) // 243)


@kernel
def _tq2_0_kernel(x, d, out):
    """``quantize_row_tq2_0_ref``: byte ``32h + m`` holds the trits of elements ``128h + m + 32k`` at bits 2k."""
    t = np.empty(256, dtype=np.int64)
    for b in range(x.shape[0]):
        d[b] = _trits(x[b], t)
        for h in range(2):
            for m in range(32):
                q = 0
                for k in range(4):
                    q |= (t[128 * h + m + 32 * k] & 3) << (2 * k)
                out[b, 32 * h + m] = np.uint8(q)


def _quantize(x: np.ndarray, size: int, fn) -> np.ndarray:
    xs = np.ascontiguousarray(x.reshape(-1, 256), dtype=F32)
    d, out = np.empty(xs.shape[0], dtype=F32), np.empty((xs.shape[0], size), dtype=np.uint8)
    fn(xs, d, out)
    out[:, size - 2:] = to_f16_bytes(d)
    return out.reshape(x.shape[0], -1, size)


def quantize_tq1_0(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    return _quantize(x, 54, _tq1_0_kernel)


def quantize_tq2_0(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    return _quantize(x, 66, _tq2_0_kernel)


def dequantize_tq1_0(b: np.ndarray) -> np.ndarray:
    d = f16_from_bytes(b[:, 52:54])
    mul5 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)
    q0 = (b[:, None, 0:32] * mul5[None, :, None]).reshape(-1, 160)
    q1 = (b[:, None, 32:48] * mul5[None, :, None]).reshape(-1, 80)
    qh = (b[:, None, 48:52] * mul5[None, :4, None]).reshape(-1, 16)
    q = np.concatenate([q0, q1, qh], axis=1).astype(np.uint16)
    t = ((q * 3) >> 8).astype(np.int8) - np.int8(1)
    return t.astype(F32) * d[:, None]


def dequantize_tq2_0(b: np.ndarray) -> np.ndarray:
    d = f16_from_bytes(b[:, 64:66])
    v = (b[:, 0:64].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    return (v.reshape(-1, 256).astype(np.int8) - np.int8(1)).astype(F32) * d[:, None]
