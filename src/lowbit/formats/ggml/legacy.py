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

from lowbit.formats.ggml.jit import (block_absmax, block_minmax, block_nonfinite, importance_weights, kernel,
                                     require_finite, roundf, signed_absmax)
from lowbit.formats.ggml.numerics import F32, f16_from_bytes, seq_sum, to_f16_bytes
from lowbit.formats.ggml.search import make_qkx_quants, make_qx_quants

QK = 32


def _blocks(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, QK)


def _row_weights(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """``qw_j · sqrt(sigma2 + x_j²)`` with ``sigma2 = Σ_row x² / n`` (whole row), per block ``(R·nb, 32)``."""
    return _blocks(importance_weights(x, qw))


_SIXTEEN = np.float32(16.0)
_BIT = (np.uint32(1) << np.arange(32, dtype=np.uint32)).astype(np.uint32)

# The kernels loop to ``x.shape[1]`` (a run-time 32) rather than a literal: LLVM then vectorizes the
# element loops instead of unrolling them into scalar code.

@kernel(inline=True)
def _put_qh(out, b, qh_at, L, h):
    """The 5th bits of the ``2h`` levels ``L(j)`` as a little-endian uint32 at ``out[b, qh_at:qh_at+4]``."""
    qh = np.uint32(0)
    for j in range(2 * h):
        qh |= np.uint32((L[j] >> 4) & 1) << np.uint32(j)
    qa = max(qh_at, 0)
    for k in range(4):
        out[b, qa + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))


@kernel
def _pack_kernel(L, out, qh_at, qs_at):
    h = L.shape[1] // 2
    qs = max(qs_at, 0)
    for b in range(L.shape[0]):
        for j in range(h):
            out[b, qs + j] = np.uint8((L[b, j] & 0xF) | ((L[b, j + h] & 0xF) << 4))
        if qh_at >= 0:
            _put_qh(out, b, qh_at, L[b], h)


def _pack(L: np.ndarray, out: np.ndarray, qh_at: int, qs_at: int) -> None:
    _pack_kernel(np.ascontiguousarray(L, dtype=np.int32), out, qh_at, qs_at)


def pack_nibbles(L: np.ndarray) -> np.ndarray:
    """``(B, 32)`` levels → ``(B, 16)`` bytes: element j in the low nibble, element j+16 in the high one."""
    out = np.empty((L.shape[0], 16), dtype=np.uint8)
    _pack(L, out, -1, 0)
    return out


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: ``(B, 16)`` → ``(B, 32)`` uint8."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def _unpack_qh(b: np.ndarray) -> np.ndarray:
    qh = np.ascontiguousarray(b).view("<u4")[:, 0]
    return ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


#: byte layout per type: (type_size, offset of the f16 min or -1, offset of qh or -1, offset of the nibbles)
_LAYOUT = {"Q4_0": (18, -1, -1, 2), "Q5_0": (22, -1, 2, 6), "Q4_1": (20, 2, -1, 4), "Q5_1": (24, 2, 4, 8)}


def _blocks_out(name: str, R: int, d: np.ndarray, m: np.ndarray | None, L: np.ndarray | None,
                out: np.ndarray | None = None) -> np.ndarray:
    """Assemble ``(R, n/32, type_size)`` blocks: f16 ``d`` (and ``m``), and — unless a kernel already wrote
    them into ``out`` — the packed levels ``L``."""
    size, m_at, qh_at, qs_at = _LAYOUT[name]
    if out is None:
        out = np.empty((d.shape[0], size), dtype=np.uint8)
        _pack(L, out, qh_at, qs_at)
    out[:, 0:2] = to_f16_bytes(d)
    if m_at >= 0:
        out[:, m_at:m_at + 2] = to_f16_bytes(m)
    return out.reshape(R, -1, size)


@kernel(inline=True)
def _put_trunc_levels(x, b, x0, idb, off, top, out, qh_at, qs_at):
    """The reference's levels ``min(trunc((x − x0)·idb + off), top)`` of block ``x[b]`` (clamping before the
    float→int cast gives the same integer) as nibbles at ``out[b, qs_at:]`` and, for ``qh_at >= 0``, their 5th
    bits as the little-endian uint32 at ``out[b, qh_at:]``.

    Written straight from ``x`` with the expression spelled out, and offsets passed through ``max(·, 0)`` so
    numba can drop its negative-index wrap-around: LLVM then vectorizes the loop (2× faster).
    """
    h = x.shape[1] // 2
    qs = max(qs_at, 0)
    for j in range(h):
        t0 = (x[b, j] - x0) * idb + off
        t1 = (x[b, j + h] - x0) * idb + off
        out[b, qs + j] = np.uint8(np.int32(t0 if t0 < top else top) & 0xF) | \
            np.uint8((np.int32(t1 if t1 < top else top) & 0xF) << 4)
    if qh_at >= 0:
        qh = np.uint32(0)
        for j in range(2 * h):
            t = (x[b, j] - x0) * idb + off
            qh |= np.uint32(t >= _SIXTEEN) * _BIT[j]  # level ≥ 16 ⇔ its 5th bit (levels ≤ 31)
        qa = max(qh_at, 0)
        for k in range(4):
            out[b, qa + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))


@kernel
def _sym_ref_kernel(x, u, nmax, qh_at, qs_at, d, out):
    """``quantize_row_q4_0_ref`` / ``q5_0_ref``: d = max/−nmax, levels = trunc(x/d + nmax + 0.5) ≤ 2·nmax−1.
    ``u`` is ``x`` viewed as uint32; returns the number of NaN/Inf met."""
    off = np.float32(nmax + 0.5)
    top = np.float32(2 * nmax - 1)
    zero = np.float32(0.0)
    bad = 0
    for b in range(x.shape[0]):
        bad += block_nonfinite(u, b)
        _, mx = signed_absmax(x, b)
        db = mx / np.float32(-nmax)
        idb = np.float32(1.0) / db if db != 0 else zero
        _put_trunc_levels(x, b, zero, idb, off, top, out, qh_at, qs_at)
        d[b] = db
    return bad


@kernel
def _asym_ref_kernel(x, u, nmax, qh_at, qs_at, d, m, out):
    """``quantize_row_q4_1_ref`` / ``q5_1_ref``: d = (max−min)/nmax, levels = trunc((x−min)/d + 0.5).
    Returns the number of NaN/Inf met."""
    half = np.float32(0.5)
    top = np.float32(nmax)
    bad = 0
    for b in range(x.shape[0]):
        bad += block_nonfinite(u, b)
        mn, mx = block_minmax(x, b)
        db = (mx - mn) / np.float32(nmax)
        idb = np.float32(1.0) / db if db != 0 else np.float32(0.0)
        _put_trunc_levels(x, b, mn, idb, half, top, out, qh_at, qs_at)
        d[b] = db
        m[b] = mn
    return bad


@kernel
def _q8_0_kernel(x, u, d, out):
    """``quantize_row_q8_0_ref``: d = max|x|/127, q = roundf(x/d). Returns the number of NaN/Inf met."""
    bad = 0
    for b in range(x.shape[0]):
        bad += block_nonfinite(u, b)
        db = block_absmax(x, b) / np.float32(127.0)
        idb = np.float32(1.0) / db if db != 0 else np.float32(0.0)
        for j in range(x.shape[1]):
            out[b, 2 + j] = np.uint8(roundf(x[b, j] * idb) & 0xFF)
        d[b] = db
    return bad


def _sym(name: str, x: np.ndarray, qw: np.ndarray | None, nmax: int) -> np.ndarray:
    R = x.shape[0]
    if qw is not None:
        require_finite(x)
        d, L = make_qx_quants(_blocks(x), nmax, 1, _row_weights(x, qw))
        return _blocks_out(name, R, d, None, L)
    xb = np.ascontiguousarray(_blocks(x), dtype=F32)
    size, _, qh_at, qs_at = _LAYOUT[name]
    d, out = np.empty(xb.shape[0], dtype=F32), np.empty((xb.shape[0], size), dtype=np.uint8)
    require_finite(xb, _sym_ref_kernel(xb, xb.view(np.uint32), nmax, qh_at, qs_at, d, out))
    return _blocks_out(name, R, d, None, None, out)


def _asym(name: str, x: np.ndarray, qw: np.ndarray | None, nmax: int) -> np.ndarray:
    R = x.shape[0]
    if qw is not None:
        require_finite(x)
        scale, the_min, L = make_qkx_quants(_blocks(x), _row_weights(x, qw), nmax, -0.9, 0.05, 36, False, False)
        return _blocks_out(name, R, scale, -the_min, L)
    xb = np.ascontiguousarray(_blocks(x), dtype=F32)
    size, _, qh_at, qs_at = _LAYOUT[name]
    B = xb.shape[0]
    d, m, out = np.empty(B, dtype=F32), np.empty(B, dtype=F32), np.empty((B, size), dtype=np.uint8)
    require_finite(xb, _asym_ref_kernel(xb, xb.view(np.uint32), nmax, qh_at, qs_at, d, m, out))
    return _blocks_out(name, R, d, m, None, out)


def quantize_q4_0(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    return _sym("Q4_0", x, qw, 8)


def quantize_q5_0(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    return _sym("Q5_0", x, qw, 16)


def quantize_q4_1(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    return _asym("Q4_1", x, qw, 15)


def quantize_q5_1(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    return _asym("Q5_1", x, qw, 31)


def quantize_q8_0(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """``quantize_row_q8_0_ref``; the importance matrix is ignored, as in llama.cpp."""
    xb = np.ascontiguousarray(_blocks(x), dtype=F32)
    d, out = np.empty(xb.shape[0], dtype=F32), np.empty((xb.shape[0], 34), dtype=np.uint8)
    require_finite(xb, _q8_0_kernel(xb, xb.view(np.uint32), d, out))
    out[:, 0:2] = to_f16_bytes(d)
    return out.reshape(x.shape[0], -1, 34)


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
    if name == "Q8_0":
        b = np.concatenate([to_f16_bytes(d.reshape(-1)), Lb.astype(np.int8).view(np.uint8)], axis=1)
        return b.reshape(R, -1, 34)
    return _blocks_out(name, R, d.reshape(-1), None if m is None else m.reshape(-1), Lb)
