"""Non-linear 4-bit GGML blocks IQ4_NL and IQ4_XS (llama.cpp ``quantize_row_iq4_nl_impl``, ``ntry = 7``).

Levels are the 16 int8 values ``kvalues_iq4nl``; IQ4_NL has an f16 scale per 32 weights, IQ4_XS an f16
super-scale and 6-bit sub-scales per 256 (llama.cpp PRs #5590, #5747; no arXiv paper). ``ggml_quantize_chunk``
uses the ``ntry = 7`` search (the ``*_ref`` row function uses no search), which is what is reproduced here.

Symbols: ``x (B, n)`` blocks, ``w`` weights (``x²``, or ``qw·sqrt(sigma2 + x²)`` with an importance matrix),
``d`` scale, ``L`` index into ``KVALUES``.
"""

from __future__ import annotations

import numpy as np

from lowbit.formats.ggml.numerics import F32, f16_from_bytes, first_absmax, nearest_int, safe_recip, seq_sum, to_f16_bytes
from lowbit.formats.ggml.legacy import pack_nibbles, unpack_nibbles

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
_KV = KVALUES.astype(F32)
NTRY = 7


def best_index(v: np.ndarray) -> np.ndarray:
    """``best_index_int8``: nearest entry of ``KVALUES`` to float32 ``v``; ties go to the upper entry.

    The C binary search returns ``k+1`` between neighbours ``k, k+1`` exactly when
    ``(v - K[k]) >= (K[k+1] - v)`` in float32, and that test is monotone in ``k``; counting the true tests
    gives the same index (and the clamps at both ends) without a search.
    """
    v = np.asarray(v, dtype=F32)
    idx = np.zeros(v.shape, dtype=np.int32)
    for k in range(15):
        idx += (v - _KV[k]) >= (_KV[k + 1] - v)
    return idx


def _search(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares scale per block of 32 over 15 trial inverse scales. Returns ``d (B,)``."""
    amax, mx = first_absmax(x)
    zero = amax < F32(1e-15)
    mx = np.where(zero, F32(1), mx).astype(F32)

    def sums(inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = _KV[best_index(inv[:, None] * x)]
        wq = w * q
        return seq_sum(wq * x), seq_sum(wq * q)

    d = (-mx / _KV[0]).astype(F32)
    sumqx, sumq2 = sums((F32(1) / d).astype(F32))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), F32(0)).astype(F32)
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        inv = (F32(itry + int(KVALUES[0])) / mx).astype(F32)
        sqx, sq2 = sums(inv)
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(better, sqx / np.where(better, sq2, F32(1)), d).astype(F32)
        best = np.where(better, d * sqx, best).astype(F32)
    return np.where(zero, F32(0), d).astype(F32)


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
    L = best_index(safe_recip(d)[:, None] * xb)
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
    L = best_index(safe_recip(dl).reshape(-1, 1) * sub).reshape(S, 8, 32)
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
