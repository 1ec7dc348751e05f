"""Legacy 32-element GGML blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (llama.cpp ``ggml-quants.c``).

Round-to-nearest block quantization with one f16 scale (and an f16 min for the ``_1`` types) per 32 weights,
as introduced in ggml (no paper; the importance-matrix variants follow llama.cpp PR #4861). Without an
importance matrix the reference functions ``quantize_row_q*_ref`` are reproduced; with one, the searches of
``quantize_row_q*_impl``.

Symbols: ``x (R, n)`` rows, ``qw (n,)`` importance per column, ``d`` scale, ``m`` min, ``L`` levels,
``sigma2`` mean square of the row.

Every quantizer returns ``(R, n/32, type_size)`` uint8 and every dequantizer maps ``(B, type_size)`` uint8 to
``(B, 32)`` float32.
"""

from __future__ import annotations

import numpy as np

from lowbit.formats.ggml.numerics import (F32, f16_from_bytes, first_absmax, roundf, safe_recip, seq_sum,
                                          to_f16_bytes)
from lowbit.formats.ggml.search import make_qkx_quants, make_qx_quants

QK = 32


def _blocks(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, QK)


def _row_weights(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """``qw_j · sqrt(sigma2 + x_j²)`` with ``sigma2 = Σ_row x² / n`` (whole row), per block ``(R·nb, 32)``."""
    R, n = x.shape
    sigma2 = seq_sum(x * x) / F32(n)
    w = np.asarray(qw, dtype=F32)[None, :] * np.sqrt(sigma2[:, None] + x * x)
    return _blocks(w.astype(F32))


def pack_nibbles(L: np.ndarray) -> np.ndarray:
    """``(B, 32)`` levels → ``(B, 16)`` bytes: element j in the low nibble, element j+16 in the high one."""
    L = L.astype(np.uint8)
    return (L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4)


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: ``(B, 16)`` → ``(B, 32)`` uint8."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def _pack_qh(L: np.ndarray) -> np.ndarray:
    """5th bit of each of 32 levels → little-endian uint32 ``qh`` as ``(B, 4)`` bytes."""
    # bit j of the little-endian uint32 = bit j%8 of byte j//8: packbits in little bit order
    return np.packbits((L & 16) != 0, axis=1, bitorder="little")


def _unpack_qh(b: np.ndarray) -> np.ndarray:
    qh = np.ascontiguousarray(b).view("<u4")[:, 0]
    return ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _out(R: int, *parts: np.ndarray) -> np.ndarray:
    b = np.concatenate(parts, axis=1)
    return b.reshape(R, -1, b.shape[1])


def _sym_ref(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_row_q4_0_ref`` / ``q5_0_ref``: d = max/−nmax, levels = trunc(x/d + nmax + 0.5) ≤ 2·nmax−1."""
    xb = _blocks(x)
    _, mx = first_absmax(xb)
    d = (mx / F32(-nmax)).astype(F32)
    v = xb * safe_recip(d)[:, None]
    v += F32(nmax + 0.5)
    L = np.minimum(v.astype(np.int32), 2 * nmax - 1)  # float→int truncates toward zero, as the C cast does
    return d, L


def _asym_ref(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``quantize_row_q4_1_ref`` / ``q5_1_ref``: d = (max−min)/nmax, levels = trunc((x−min)/d + 0.5)."""
    xb = _blocks(x)
    mn = xb.min(axis=1)
    mx = xb.max(axis=1)
    d = ((mx - mn) / F32(nmax)).astype(F32)
    v = xb - mn[:, None]
    v *= safe_recip(d)[:, None]
    v += F32(0.5)
    L = np.minimum(v.astype(np.int32), nmax)
    return d, mn, L


def quantize_q4_0(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    R = x.shape[0]
    if qw is None:
        d, L = _sym_ref(x, 8)
    else:
        d, L = make_qx_quants(_blocks(x), 8, 1, _row_weights(x, qw))
    return _out(R, to_f16_bytes(d), pack_nibbles(L))


def quantize_q5_0(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    R = x.shape[0]
    if qw is None:
        d, L = _sym_ref(x, 16)
    else:
        d, L = make_qx_quants(_blocks(x), 16, 1, _row_weights(x, qw))
    return _out(R, to_f16_bytes(d), _pack_qh(L), pack_nibbles(L))


def _asym_imatrix(x: np.ndarray, qw: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale, the_min, L = make_qkx_quants(_blocks(x), _row_weights(x, qw), nmax, -0.9, 0.05, 36, False, False)
    return scale, -the_min, L


def quantize_q4_1(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    R = x.shape[0]
    d, m, L = _asym_ref(x, 15) if qw is None else _asym_imatrix(x, qw, 15)
    return _out(R, to_f16_bytes(d), to_f16_bytes(m), pack_nibbles(L))


def quantize_q5_1(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    R = x.shape[0]
    d, m, L = _asym_ref(x, 31) if qw is None else _asym_imatrix(x, qw, 31)
    return _out(R, to_f16_bytes(d), to_f16_bytes(m), _pack_qh(L), pack_nibbles(L))


def quantize_q8_0(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """``quantize_row_q8_0_ref``; the importance matrix is ignored, as in llama.cpp."""
    R = x.shape[0]
    xb = _blocks(x)
    d = (np.abs(xb).max(axis=1) / F32(127)).astype(F32)
    q = roundf(xb * safe_recip(d)[:, None]).astype(np.int8)
    return _out(R, to_f16_bytes(d), q.view(np.uint8))


def dequantize_q4_0(b: np.ndarray) -> np.ndarray:
    d = f16_from_bytes(b[:, 0:2])
    q = unpack_nibbles(b[:, 2:18]).astype(np.int8) - np.int8(8)
    return d[:, None] * q.astype(F32)


def dequantize_q4_1(b: np.ndarray) -> np.ndarray:
    d, m = f16_from_bytes(b[:, 0:2]), f16_from_bytes(b[:, 2:4])
    q = unpack_nibbles(b[:, 4:20]).astype(F32)
    return d[:, None] * q + m[:, None]


def dequantize_q5_0(b: np.ndarray) -> np.ndarray:
    d = f16_from_bytes(b[:, 0:2])
    q = (unpack_nibbles(b[:, 6:22]) | (_unpack_qh(b[:, 2:6]) << 4)).astype(np.int8) - np.int8(16)
    return d[:, None] * q.astype(F32)


def dequantize_q5_1(b: np.ndarray) -> np.ndarray:
    d, m = f16_from_bytes(b[:, 0:2]), f16_from_bytes(b[:, 2:4])
    q = (unpack_nibbles(b[:, 8:24]) | (_unpack_qh(b[:, 4:8]) << 4)).astype(F32)
    return d[:, None] * q + m[:, None]


def dequantize_q8_0(b: np.ndarray) -> np.ndarray:
    d = f16_from_bytes(b[:, 0:2])
    return np.ascontiguousarray(b[:, 2:34]).view(np.int8).astype(F32) * d[:, None]


# ---------------------------------------------------------------------------------------------- given parameters
#: types whose blocks are one f16 scale (and an f16 min) per 32 weights: (first level, last level, offset, asym)
PARAM_TYPES = {"Q4_0": (0, 15, 8, False), "Q5_0": (0, 31, 16, False), "Q8_0": (-128, 127, 0, False),
               "Q4_1": (0, 15, 0, True), "Q5_1": (0, 31, 0, True)}


def reference_params(name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The (f16-exact) scale and min the reference quantizer picks per 32-block of ``x (R, n)``: ``(R, n/32)``."""
    blocks = {"Q4_0": quantize_q4_0, "Q5_0": quantize_q5_0, "Q8_0": quantize_q8_0, "Q4_1": quantize_q4_1,
              "Q5_1": quantize_q5_1}[name](x, None)
    d = f16_from_bytes(blocks[..., 0:2])
    m = f16_from_bytes(blocks[..., 2:4]) if PARAM_TYPES[name][3] else None
    return d, m


def levels_with_params(name: str, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """Nearest stored level of each ``x (R, n)`` under given per-block ``d``/``m`` ``(R, n/32)`` (or ``(R, 1)``
    broadcast over all columns)."""
    lo, hi, off, asym = PARAM_TYPES[name]
    R, n = x.shape
    rep = 1 if d.shape[1] == 1 else QK
    dd = np.repeat(d, rep, axis=1)[:, :n] if rep > 1 else np.broadcast_to(d, x.shape)
    v = x - (np.repeat(m, rep, axis=1)[:, :n] if rep > 1 else m) if asym else x
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(dd != 0, np.rint(v / np.where(dd != 0, dd, F32(1))), F32(0))
    return np.clip(q + off, lo, hi).astype(np.int32)


def value_of_levels(name: str, L: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """Dequantized value of levels ``L`` under ``d``/``m`` (same broadcasting as :func:`levels_with_params`)."""
    lo, hi, off, asym = PARAM_TYPES[name]
    n = L.shape[1]
    rep = 1 if d.shape[1] == 1 else QK
    dd = np.repeat(d, rep, axis=1)[:, :n] if rep > 1 else d
    val = dd * (L - off).astype(F32)
    if asym:
        val = val + (np.repeat(m, rep, axis=1)[:, :n] if rep > 1 else m)
    return val.astype(F32)


def pack_with_params(name: str, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """Blocks ``(R, n/32, type_size)`` that store ``x`` rounded to nearest under the given scales/mins."""
    R = x.shape[0]
    L = levels_with_params(name, x, d, m)
    Lb = L.reshape(-1, QK)
    db = to_f16_bytes(d.reshape(-1))
    if name == "Q8_0":
        return _out(R, db, Lb.astype(np.int8).view(np.uint8))
    if name == "Q4_0":
        return _out(R, db, pack_nibbles(Lb))
    if name == "Q5_0":
        return _out(R, db, _pack_qh(Lb), pack_nibbles(Lb))
    mb = to_f16_bytes(m.reshape(-1))  # type: ignore[union-attr]
    if name == "Q4_1":
        return _out(R, db, mb, pack_nibbles(Lb))
    return _out(R, db, mb, _pack_qh(Lb), pack_nibbles(Lb))
