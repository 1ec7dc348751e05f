"""Exact float32 primitives of ggml's reference quantizers (ggml-quants.c, ggml-impl.h).

Bit-exactness with llama.cpp depends on reproducing C float32 semantics: every operation rounds to float32,
reductions run left to right, and three different rounding rules are in use. Everything here works on
numpy float32 arrays with a leading batch of blocks, so one call handles every block of a tensor (the per-block
loops themselves are compiled, see :mod:`lowbit.formats.ggml.jit`; these serve the array-level steps around
them).

Symbols: ``x`` block values (float32), ``L`` integer levels, ``w`` weights, ``n`` elements per block.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def seq_sum(a: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over the last axis, as a C ``for`` loop accumulates (not pairwise).

    Args:
        a: ``(..., n)`` float32.

    Returns:
        ``(...)`` float32.
    """
    a = np.asarray(a, dtype=F32)
    if a.shape[-1] == 0:
        return np.zeros(a.shape[:-1], dtype=F32)
    s = a[..., 0].copy()
    for i in range(1, a.shape[-1]):
        s += a[..., i]
    return s


def nearest_int(f: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: float32 round-half-to-even via the 1.5·2^23 trick (valid for |f| ≤ 4194303).

    Returns:
        int32 array of the same shape.
    """
    v = (np.asarray(f, dtype=F32) + F32(12582912.0)).view(np.int32)
    return (v & 0x7FFFFF) - 0x400000


def to_f16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 → IEEE half (round to nearest even), as little-endian bytes ``(..., 2)`` uint8."""
    return np.ascontiguousarray(np.asarray(v, dtype=F32).astype("<f2")).view(np.uint8).reshape(*np.shape(v), 2)


def f16_round(v: np.ndarray) -> np.ndarray:
    """float32 → half → float32 (the value the dequantizer will read back)."""
    return np.asarray(v, dtype=F32).astype(np.float16).astype(F32)


def f16_from_bytes(b: np.ndarray) -> np.ndarray:
    """``(..., 2)`` uint8 little-endian half → ``(...)`` float32."""
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(F32)


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed value with the largest magnitude per row (first on ties, as a strict ``>`` scan keeps).

    Returns:
        ``(amax, max)``: ``amax = |max|`` and ``max`` the signed value, each ``(...)`` float32.
    """
    idx = np.argmax(np.abs(x), axis=-1)
    mx = np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]
    return np.abs(mx), mx


def safe_recip(d: np.ndarray) -> np.ndarray:
    """``d ? 1/d : 0`` in float32."""
    d = np.asarray(d, dtype=F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d != 0, F32(1.0) / np.where(d != 0, d, F32(1.0)), F32(0.0)).astype(F32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """ggml's ``ggml_compute_fp32_to_bf16``: round to nearest even, NaN forced quiet. Returns uint16."""
    u = np.ascontiguousarray(np.asarray(x, dtype=F32)).view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = ((u.astype(np.uint64) + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(nan, ((u >> 16) | 64).astype(np.uint16), rounded)
