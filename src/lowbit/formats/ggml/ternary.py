"""Ternary GGML blocks TQ1_0 (1.6875 bpw, base-3 packed) and TQ2_0 (2.0625 bpw) for BitNet b1.58 weights.

Reproduces ``quantize_row_tq1_0_ref`` / ``quantize_row_tq2_0_ref`` (llama.cpp PR #8151; BitNet b1.58,
arXiv:2402.17764): ``d = max|x|`` per 256 weights, trits ``t = round(x/d) + 1 ∈ {0, 1, 2}``. The importance
matrix is ignored, as in llama.cpp.
"""

from __future__ import annotations

import numpy as np

from lowbit.formats.ggml.numerics import F32, f16_from_bytes, roundf, safe_recip, to_f16_bytes

_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.int32)


def _trits(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xs = x.reshape(-1, 256)
    d = np.abs(xs).max(axis=1).astype(F32)
    t = roundf(xs * safe_recip(d)[:, None]).astype(np.int32) + 1
    return d, t


def quantize_tq1_0(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    R = x.shape[0]
    d, t = _trits(x)
    S = t.shape[0]
    q0 = np.einsum("snm,n->sm", t[:, :160].reshape(S, 5, 32), _POW3)
    q1 = np.einsum("snm,n->sm", t[:, 160:240].reshape(S, 5, 16), _POW3)
    qh = np.einsum("snm,n->sm", t[:, 240:256].reshape(S, 4, 4), _POW3[1:]) * 3
    q = np.concatenate([q0, q1, qh], axis=1)
    q = ((q * 256 + 242) // 243).astype(np.uint8)
    return np.concatenate([q, to_f16_bytes(d)], axis=1).reshape(R, -1, 54)


def quantize_tq2_0(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    R = x.shape[0]
    d, t = _trits(x)
    v = t.astype(np.uint8).reshape(-1, 2, 4, 32)
    qs = (v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)).reshape(-1, 64)
    return np.concatenate([qs, to_f16_bytes(d)], axis=1).reshape(R, -1, 66)


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
