"""Non-linear 4-bit GGML blocks IQ4_NL and IQ4_XS (llama.cpp ``quantize_row_iq4_nl_impl``, ``ntry = 7``).

Levels are the 16 int8 values ``kvalues_iq4nl``; IQ4_NL has an f16 scale per 32 weights, IQ4_XS an f16
super-scale and 6-bit sub-scales per 256 (llama.cpp PRs #5590, #5747; no arXiv paper). ``ggml_quantize_chunk``
uses the ``ntry = 7`` search (the ``*_ref`` row function uses no search), which is what is reproduced here.

Symbols: ``x (B, n)`` blocks, ``w`` weights (``x²``, or ``qw·sqrt(sigma2 + x²)`` with an importance matrix),
``d`` scale, ``L`` index into ``KVALUES``.
"""

from __future__ import annotations

import numpy as np

from lowbit.formats.ggml.jit import kernel, signed_absmax
from lowbit.formats.ggml.legacy import pack_nibbles, unpack_nibbles
from lowbit.formats.ggml.numerics import F32, f16_from_bytes, first_absmax, nearest_int, safe_recip, seq_sum, to_f16_bytes

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
_KV = KVALUES.astype(F32)
_K0 = int(KVALUES[0])
NTRY = 7


@kernel
def _best_index(v):
    """``best_index_int8``: nearest entry of ``KVALUES`` to float32 ``v`` by C's binary search; ties go up."""
    if v <= _KV[0]:
        return 0
    if v >= _KV[15]:
        return 15
    lo, hi = 0, 15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if v < _KV[mid]:
            hi = mid
        else:
            lo = mid
    return hi - 1 if v - _KV[hi - 1] < _KV[hi] - v else hi


@kernel
def _levels(x, d, L):
    """``L = best_index(x / d)`` per block (``1/d``, or 0 for d = 0, as the C code multiplies)."""
    for b in range(x.shape[0]):
        idb = np.float32(1.0) / d[b] if d[b] != 0 else np.float32(0.0)
        for j in range(x.shape[1]):
            L[b, j] = _best_index(idb * x[b, j])


@kernel(inline=True)
def _trial(x, w, b, idb):
    """``(Σ w·q·x, Σ w·q²)`` over block ``x[b]`` with ``q`` the table value nearest to ``idb·x``."""
    sumqx = np.float32(0.0)
    sumq2 = np.float32(0.0)
    for j in range(x.shape[1]):
        q = _KV[_best_index(idb * x[b, j])]
        sumqx += w[b, j] * q * x[b, j]
        sumq2 += w[b, j] * q * q
    return sumqx, sumq2


@kernel
def _search_kernel(x, w, d):
    """Weighted least-squares scale per block of 32 over 2·NTRY+1 trial inverse scales."""
    for b in range(x.shape[0]):
        amax, mx = signed_absmax(x, b)
        if amax < np.float32(1e-15):
            d[b] = np.float32(0.0)
            continue
        db = -mx / _KV[0]
        sumqx, sumq2 = _trial(x, w, b, np.float32(1.0) / db)
        db = sumqx / sumq2 if sumq2 > 0 else np.float32(0.0)
        best = db * sumqx
        for itry in range(-NTRY, NTRY + 1):
            sumqx, sumq2 = _trial(x, w, b, np.float32(itry + _K0) / mx)
            if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                db = sumqx / sumq2
                best = db * sumqx
        d[b] = db


def _search(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Scale per block of 32 (``x``, ``w`` ``(B, 32)``). Returns ``d (B,)`` float32."""
    d = np.empty(x.shape[0], dtype=F32)
    _search_kernel(np.ascontiguousarray(x, dtype=F32), np.ascontiguousarray(w, dtype=F32), d)
    return d


def _best_levels(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    L = np.empty(x.shape, dtype=np.int32)
    _levels(np.ascontiguousarray(x, dtype=F32), np.ascontiguousarray(d, dtype=F32), L)
    return L


def _weights(xs: np.ndarray, qw: np.ndarray | None, sub: int) -> np.ndarray:
    """Per-element weights for super-blocks ``xs (S, n)``; ``sigma2 = 2·Σx²/n`` only enters with ``qw``."""
    if qw is None:
        return (xs * xs).reshape(-1, sub)
    sigma2 = seq_sum(xs * xs) * F32(2.0 / xs.shape[1])
    return (qw * np.sqrt(sigma2[:, None] + xs * xs)).astype(F32).reshape(-1, sub)


def _qw_blocks(qw: np.ndarray | None, R: int, n: int, size: int) -> np.ndarray | None:
    if qw is None:
        return None
    w = np.broadcast_to(np.asarray(qw, dtype=F32).reshape(1, n // size, size), (R, n // size, size))
    return w.reshape(-1, size)


def quantize_iq4_nl(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    R, n = x.shape
    xb = x.reshape(-1, 32)
    w = _weights(xb, _qw_blocks(qw, R, n, 32), 32)
    d = _search(xb, w)
    L = _best_levels(xb, d)
    out = np.concatenate([to_f16_bytes(d), pack_nibbles(L)], axis=1)
    return out.reshape(R, -1, 18)


def quantize_iq4_xs(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    R, n = x.shape
    xs = x.reshape(-1, 256)
    S = xs.shape[0]
    w = _weights(xs, _qw_blocks(qw, R, n, 256), 32)
    sub = xs.reshape(-1, 32)
    scales = _search(sub, w).reshape(S, 8)
    _, max_scale = first_absmax(scales)
    d = (-max_scale / F32(32)).astype(F32)
    l = np.clip(nearest_int(safe_recip(d)[:, None] * scales), -32, 31)
    dl = (d[:, None] * l.astype(F32)).astype(F32)
    L = _best_levels(sub, dl.reshape(-1)).reshape(S, 8, 32)
    lu = (l + 32).astype(np.uint8)
    scales_l = (lu[:, 0::2] & 0xF) | ((lu[:, 1::2] & 0xF) << 4)
    scales_h = np.bitwise_or.reduce((lu >> 4).astype(np.uint16) << (2 * np.arange(8, dtype=np.uint16)), axis=1)
    qs = pack_nibbles(L.reshape(-1, 32)).reshape(S, 128)
    out = np.concatenate([to_f16_bytes(d), scales_h.astype("<u2").view(np.uint8).reshape(S, 2), scales_l, qs], axis=1)
    return out.reshape(R, -1, 136)


def dequantize_iq4_nl(b: np.ndarray) -> np.ndarray:
    d = f16_from_bytes(b[:, 0:2])
    return d[:, None] * _KV[unpack_nibbles(b[:, 2:18])]


def dequantize_iq4_xs(b: np.ndarray) -> np.ndarray:
    d = f16_from_bytes(b[:, 0:2])
    sh = np.ascontiguousarray(b[:, 2:4]).view("<u2")[:, 0]
    sl = b[:, 4:8]
    low = np.stack([sl & 0xF, sl >> 4], axis=2).reshape(-1, 8)
    high = ((sh[:, None] >> (2 * np.arange(8, dtype=np.uint16))) & 3).astype(np.uint8)
    ls = (low | (high << 4)).astype(np.int32) - 32
    dl = (d[:, None] * ls.astype(F32))[..., None]
    q = _KV[unpack_nibbles(b[:, 8:136].reshape(-1, 16))].reshape(-1, 8, 32)
    return (dl * q).reshape(-1, 256)
