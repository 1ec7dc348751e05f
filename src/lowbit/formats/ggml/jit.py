"""Compiled scalar primitives of ggml's reference quantizers, and the decorator that compiles the block loops.

The block quantizers loop over blocks in compiled code (numba), one pass per block as ``ggml-quants.c`` does,
instead of many numpy passes over temporaries. To stay bit-identical with C, kernels keep float32 values in
float32: every constant is an ``np.float32`` (numba, like numpy, promotes ``float32 op python-float`` to
float64), operations run in the reference's order, and no fast-math flag lets LLVM reassociate or fuse them.

:func:`kernel` compiles with ``nogil`` (``quantize_raw``'s row threads run in parallel) and caches the machine
code on disk (``__pycache__`` next to this package, else numba's per-user cache dir, else ``NUMBA_CACHE_DIR``),
so a process pays the compile time (a few seconds per kernel) only the first time ever; when no cache location
is writable, kernels compile once per process instead.
"""

from __future__ import annotations

import logging

import numpy as np
from numba import njit

logger = logging.getLogger(__name__)

F32 = np.float32
_MAGIC = np.float32(12582912.0)  # 1.5·2^23
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)


def kernel(fn=None, *, inline: bool = False):
    """``numba.njit(nogil=True, cache=True)``, falling back to an uncached compile if no cache dir is writable.

    ``inline=True`` for helpers called once per block: numba then inlines them into the caller (a real call
    that passes arrays costs reference-count updates, more than a 32-element block's arithmetic).
    """
    if fn is None:
        return lambda f: kernel(f, inline=inline)
    opts = {"nogil": True, "inline": "always" if inline else "never"}
    try:
        return njit(cache=True, **opts)(fn)
    except RuntimeError as e:  # numba: "cannot cache function ...: no locator available"
        logger.debug("numba cannot cache %s (%s); compiling per process", fn.__name__, e)
        return njit(**opts)(fn)


@kernel
def _nearest_int_bits(v):
    return (np.array([v]).view(np.int32)[0] & 0x7FFFFF) - 0x400000


@kernel
def nearest_int(f):
    """ggml's ``nearest_int`` of a float32 scalar, bit-exact including its wrap-around outside ±4194303."""
    v = np.float32(f + _MAGIC)
    if v >= np.float32(8388608.0) and v < np.float32(16777216.0):  # the exponent is 23: bits = 2^23 + mantissa
        return np.int32(v) - np.int32(12582912)
    return _nearest_int_bits(v)


@kernel(inline=True)
def nearest_int_in_range(f):
    """:func:`nearest_int` for callers that guarantee ``|f| ≤ 4194303`` (no wrap-around branch)."""
    return np.int32(np.float32(f + _MAGIC)) - np.int32(12582912)


@kernel(inline=True)
def roundf(f):
    """C ``roundf`` (half away from zero) of a float32 scalar of magnitude < 2^31, as an int32."""
    a = abs(f)
    i = np.int32(a)  # truncation = floor for a ≥ 0
    i = i + np.int32(1) if a - np.float32(i) >= _HALF else i
    return -i if f < 0 else i


# Block helpers take the 2-D array and a block index rather than a row view (a view per block costs two
# atomic reference-count updates, more than the block's arithmetic) and loop to the run-time ``x.shape[1]``.

@kernel(inline=True)
def block_absmax(x, b):
    """``max |x[b]|`` (C's ``MAX(amax, fabsf(v))`` loop; max is exact, so four interleaved running maxima give
    the same value with a quarter of the dependency chain). The row length must be a multiple of 4."""
    m0 = np.float32(0.0)
    m1 = np.float32(0.0)
    m2 = np.float32(0.0)
    m3 = np.float32(0.0)
    for j in range(0, x.shape[1], 4):
        v0 = abs(x[b, j])
        v1 = abs(x[b, j + 1])
        v2 = abs(x[b, j + 2])
        v3 = abs(x[b, j + 3])
        m0 = v0 if v0 > m0 else m0
        m1 = v1 if v1 > m1 else m1
        m2 = v2 if v2 > m2 else m2
        m3 = v3 if v3 > m3 else m3
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    return m2 if m2 > m0 else m0


@kernel(inline=True)
def block_absmax_tree(x, b, t):
    """:func:`block_absmax` by a pairwise tree in the scratch row ``t`` (the element-wise halving steps
    vectorize: 2× faster for 256-blocks, slower for 32-blocks). The row length must be a power of two."""
    n = x.shape[1]
    for j in range(n):
        t[j] = abs(x[b, j])
    h = n // 2
    while h >= 1:
        for j in range(h):
            t[j] = t[j] if t[j] >= t[j + h] else t[j + h]
        h //= 2
    return t[0]


@kernel(inline=True)
def block_minmax(x, b):
    """``(min, max)`` of block ``x[b]``; the first of equal values (±0) wins, as in C's strict scans."""
    mn = x[b, 0]
    mx = x[b, 0]
    for j in range(1, x.shape[1]):
        v = x[b, j]
        mn = v if v < mn else mn
        mx = v if v > mx else mx
    return mn, mx


@kernel(inline=True)
def signed_absmax(x, b):
    """``(amax, max)``: the signed value of largest magnitude of block ``x[b]``, the first one on ties (C's
    strict ``>`` scan; +0 for an all-zero block)."""
    amax = np.float32(0.0)
    mx = np.float32(0.0)
    for j in range(x.shape[1]):
        v = abs(x[b, j])
        if v > amax:
            amax = v
            mx = x[b, j]
    return amax, mx


class NonFiniteInput(ValueError):
    """A quantizer met NaN/Inf in its input (``quantize_raw`` turns it into its user-facing error)."""


_EXP = np.uint32(0x7F800000)


@kernel(inline=True)
def block_nonfinite(u, b):
    """Number of NaN/Inf in block ``b`` of float32 values given as their uint32 bit patterns ``u`` (exponent
    all ones). Kernels call it on the block they just loaded, so the check costs no extra pass over memory."""
    c = 0
    for j in range(u.shape[1]):
        c += (u[b, j] & _EXP) == _EXP
    return c


@kernel
def _count_nonfinite_bits(u):
    c = 0
    for i in range(u.shape[0]):
        c += (u[i] & _EXP) == _EXP
    return c


def all_finite(x: np.ndarray) -> bool:
    """Whether a C-contiguous float32 array holds no NaN/Inf (one compiled pass, no temporaries)."""
    return _count_nonfinite_bits(x.reshape(-1).view(np.uint32)) == 0


def require_finite(x: np.ndarray, bad: int | None = None) -> None:
    """Raise :class:`NonFiniteInput` if ``x`` holds NaN/Inf (or if a kernel counted ``bad > 0`` of them)."""
    if (bad is not None and bad > 0) or (bad is None and not all_finite(x)):
        raise NonFiniteInput("input holds NaN/Inf values")


@kernel
def _importance_weights_kernel(x, qw, factor, out):
    m = x.shape[1]
    nq = qw.shape[0]
    for r in range(x.shape[0]):
        s2 = np.float32(0.0)
        for j in range(m):
            s2 += x[r, j] * x[r, j]
        sigma2 = (factor * s2) / np.float32(m)
        for j in range(m):
            out[r, j] = qw[(r * m + j) % nq] * np.sqrt(sigma2 + x[r, j] * x[r, j])


def importance_weights(x: np.ndarray, qw: np.ndarray, factor: float = 1.0) -> np.ndarray:
    """``qw_j · sqrt(sigma2 + x_j²)`` with ``sigma2 = factor·Σ_row x² / m`` (left-to-right float32 sum), the
    per-element weights of llama.cpp's importance-matrix searches, for rows ``x (R, m)`` that tile the
    importance vector ``qw`` (a whole weight row, or a 256-column super-block of it, in row order)."""
    x = np.ascontiguousarray(x, dtype=F32)
    out = np.empty(x.shape, dtype=F32)
    _importance_weights_kernel(x, np.ascontiguousarray(qw, dtype=F32).reshape(-1), F32(factor), out)
    return out
