"""Ternary GGML blocks TQ1_0 (1.6875 bpw, base-3 packed) and TQ2_0 (2.0625 bpw) for BitNet b1.58 weights.

Reproduces ``quantize_row_tq1_0_ref`` / ``quantize_row_tq2_0_ref`` (llama.cpp PR #8151; BitNet b1.58,
arXiv:2402.17764): ``d = max|x|`` per 256 weights, trits ``t = round(x/d) + 1 ∈ {0, 1, 2}``. The importance
matrix is ignored, as in llama.cpp.
"""

from __future__ import annotations

import numpy as np

from lowbit.formats.ggml.jit import block_absmax_tree, block_nonfinite, kernel, require_finite, roundf
from lowbit.formats.ggml.numerics import F32, f16_from_bytes, to_f16_bytes

@kernel(inline=True)
def _trits(x, b, t, scratch):
    """``d = max|x[b]|`` and the trits ``t = roundf(x/d) + 1 ∈ {0, 1, 2}`` of block ``x[b]`` (into ``t``)."""
    amax = block_absmax_tree(x, b, scratch)
    idb = np.float32(1.0) / amax if amax != 0 else np.float32(0.0)
    for j in range(x.shape[1]):
        t[j] = roundf(x[b, j] * idb) + 1
    return amax


@kernel(inline=True)
def _base3_bytes(t, first, width, ntrits, out, b, at):
    """Bytes ``out[b, at + m]``, m < width: trits ``t[first + m + k·width]`` (k < ntrits) as a base-3 number
    (most significant first, padded to 5 digits), scaled to a byte: ``(q·256 + 242) // 243``."""
    a = max(at, 0)  # max(·, 0): lets numba drop its negative-index wrap-around, so LLVM vectorizes the loop
    f = max(first, 0)
    width = max(width, 0)
    pad = 1
    for k in range(ntrits, 5):
        pad *= 3
    for m in range(width):
        q = np.int32(0)
        for k in range(ntrits):
            q = q * 3 + t[f + m + k * width]
        q *= pad
        out[b, a + m] = np.uint8((q * 256 + 242) // 243)


@kernel
def _tq1_0_kernel(x, u, d, out):
    """``quantize_row_tq1_0_ref``: 5 trits per byte for elements 0..239 (groups of 32 and 16 bytes), 4 for the
    last 16; byte ``m`` of a group holds elements ``m + k·width``. Loop bounds derive from the run-time block
    size (256) so LLVM vectorizes them."""
    n = x.shape[1]
    t = np.empty(n, dtype=np.int32)
    scratch = np.empty(n, dtype=np.float32)
    bad = 0
    for b in range(x.shape[0]):
        bad += block_nonfinite(u, b)
        d[b] = _trits(x, b, t, scratch)
        _base3_bytes(t, 0, n // 8, 5, out, b, 0)
        _base3_bytes(t, 5 * (n // 8), n // 16, 5, out, b, n // 8)
        _base3_bytes(t, 5 * (n // 8) + 5 * (n // 16), n // 64, 4, out, b, n // 8 + n // 16)
    return bad


@kernel
def _tq2_0_kernel(x, u, d, out):
    """``quantize_row_tq2_0_ref``: byte ``32h + m`` holds the trits of elements ``128h + m + 32k`` at bits 2k."""
    n = x.shape[1]
    w = max(n // 8, 0)
    t = np.empty(n, dtype=np.int32)
    scratch = np.empty(n, dtype=np.float32)
    bad = 0
    for b in range(x.shape[0]):
        bad += block_nonfinite(u, b)
        d[b] = _trits(x, b, t, scratch)
        for h in range(2):
            for m in range(w):
                out[b, w * h + m] = np.uint8(t[4 * w * h + m] | (t[4 * w * h + m + w] << 2) |
                                             (t[4 * w * h + m + 2 * w] << 4) | (t[4 * w * h + m + 3 * w] << 6))
    return bad


def _quantize(x: np.ndarray, size: int, fn) -> np.ndarray:
    xs = np.ascontiguousarray(x.reshape(-1, 256), dtype=F32)
    d, out = np.empty(xs.shape[0], dtype=F32), np.empty((xs.shape[0], size), dtype=np.uint8)
    require_finite(xs, fn(xs, xs.view(np.uint32), d, out))
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
