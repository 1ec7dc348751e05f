"""The scale searches of llama.cpp's reference quantizers, compiled per block.

Each kernel mirrors one routine of ``ggml-quants.c`` (ggml-org/ggml, k-quants PR #1684 and the imatrix
PR #4861) operation for operation in float32 (see :mod:`lowbit.formats.ggml.jit`), so that the chosen levels
and scales are bit-identical; it loops over the blocks of a ``(B, n)`` array in one compiled pass, and the
Python functions below take and return whole arrays.

Symbols (as in the C code):
    x: ``(B, n)`` values of B blocks of n elements.   w: ``(B, n)`` weights of the weighted squared error.
    L: ``(B, n)`` integer levels.   nmax: number of positive levels.   scale, min: per block ``(B,)``.
"""

from __future__ import annotations

import numpy as np

from lowbit.formats.ggml.jit import kernel, nearest_int, nearest_int_in_range, signed_absmax

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
_Z = F32(0.0)
_ONE = F32(1.0)
_TENTH = F32(0.1)


def _c(a: np.ndarray | None, like: np.ndarray) -> np.ndarray:
    """Contiguous float32 (one compiled specialization per kernel), or an empty placeholder for None."""
    if a is None:
        return np.empty((0, like.shape[1]), dtype=F32)
    return np.ascontiguousarray(np.broadcast_to(a, like.shape), dtype=F32)


@kernel
def _qx_kernel(x, qw, nmax, rmse_type, scale, L):
    # every rounded value is iscale·x with |iscale| ≤ (nmax + 0.9)/max|x|: within nearest_int's exact range
    B, n = x.shape
    has_qw = qw.shape[0] > 0
    w = np.empty(n, dtype=np.float32)
    for b in range(B):
        amax, mx = signed_absmax(x, b)
        if amax < GROUP_MAX_EPS:
            L[b, :] = 0
            scale[b] = _Z
            continue
        iscale = np.float32(-nmax) / mx
        if rmse_type == 0:
            for i in range(n):
                L[b, i] = nmax + min(max(nearest_int_in_range(iscale * x[b, i]), -nmax), nmax - 1)
            scale[b] = _ONE / iscale
            continue
        for i in range(n):
            if has_qw:
                w[i] = qw[b, i]
            elif rmse_type == 1:
                w[i] = x[b, i] * x[b, i]
            elif rmse_type == 2:
                w[i] = _ONE
            elif rmse_type == 3:
                w[i] = abs(x[b, i])
            else:
                w[i] = np.sqrt(abs(x[b, i]))
        sumlx = _Z
        suml2 = _Z
        for i in range(n):
            l = min(max(nearest_int_in_range(iscale * x[b, i]), -nmax), nmax - 1)
            L[b, i] = l + nmax
            lf = np.float32(l)
            sumlx += w[i] * x[b, i] * lf
            suml2 += w[i] * lf * lf
        sc = sumlx / suml2 if suml2 != _Z else _Z
        best = sc * sumlx
        for it in range(-9, 10):
            if it == 0:
                continue
            isc = -(np.float32(nmax) + _TENTH * np.float32(it)) / mx
            sumlx = _Z
            suml2 = _Z
            for i in range(n):
                lf = np.float32(min(max(nearest_int_in_range(isc * x[b, i]), -nmax), nmax - 1))
                sumlx += w[i] * x[b, i] * lf
                suml2 += w[i] * lf * lf
            if suml2 > _Z and sumlx * sumlx > best * suml2:
                for i in range(n):
                    L[b, i] = nmax + min(max(nearest_int_in_range(isc * x[b, i]), -nmax), nmax - 1)
                sc = sumlx / suml2
                best = sc * sumlx
        scale[b] = sc


def make_qx_quants(x: np.ndarray, nmax: int, rmse_type: int, qw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search (``make_qx_quants``): levels ``l ∈ [-nmax, nmax-1]``, stored ``L = l + nmax``.

    Returns:
        ``(scale (B,), L (B, n) int32)``; an all-(near-)zero block gets scale 0 and levels 0.
    """
    x = np.ascontiguousarray(x, dtype=F32)
    scale = np.empty(x.shape[0], dtype=F32)
    L = np.empty(x.shape, dtype=np.int32)
    _qx_kernel(x, _c(qw, x), int(nmax), int(rmse_type), scale, L)
    return scale, L


@kernel(inline=True)
def _descend(x, w, L, sumlx, suml2, lo, hi, qp):
    """Up to five rounds of one-element-at-a-time coordinate descent on ``sumlx² / suml2`` (the end of
    ``make_q3_quants`` (``qp`` False) and ``make_qp_quants`` (True), which differ in when ``suml2 > 0`` is
    tested). Updates ``L`` in place and returns the final sums."""
    n = x.shape[0]
    for _ in range(5):
        changed = False
        for i in range(n):
            wi = w[i]
            xi = x[i]
            Li = np.float32(L[i])
            slx = sumlx - wi * xi * Li
            sl2 = suml2 - wi * Li * Li
            if qp:
                if not (slx > _Z and sl2 > _Z):
                    continue
            elif not slx > _Z:
                continue
            new = min(max(nearest_int(xi * sl2 / slx), lo), hi)
            if new == L[i]:
                continue
            nf = np.float32(new)
            slx += wi * xi * nf
            sl2 += wi * nf * nf
            if (qp or sl2 > _Z) and slx * slx * suml2 > sumlx * sumlx * sl2:
                L[i] = new
                sumlx = slx
                suml2 = sl2
                changed = True
        if not changed:
            break
    return sumlx, suml2


@kernel
def _q3_kernel(x, nmax, scale, L):
    B, n = x.shape
    w = np.empty(n, dtype=np.float32)
    xl = np.empty(n, dtype=np.float32)
    Ll = np.empty(n, dtype=np.int32)
    for b in range(B):
        amax, mx = signed_absmax(x, b)
        if amax < GROUP_MAX_EPS:
            L[b, :] = 0
            scale[b] = _Z
            continue
        iscale = np.float32(-nmax) / mx
        sumlx = _Z
        suml2 = _Z
        for i in range(n):
            l = min(max(nearest_int(iscale * x[b, i]), -nmax), nmax - 1)
            L[b, i] = l
            w[i] = x[b, i] * x[b, i]
            lf = np.float32(l)
            sumlx += w[i] * x[b, i] * lf
            suml2 += w[i] * lf * lf
        for i in range(n):
            xl[i] = x[b, i]
            Ll[i] = L[b, i]
        sumlx, suml2 = _descend(xl, w, Ll, sumlx, suml2, -nmax, nmax - 1, False)
        for i in range(n):
            L[b, i] = Ll[i] + nmax
        scale[b] = sumlx / suml2 if suml2 > _Z else _Z


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants(..., do_rmse=true)``: x²-weighted symmetric levels refined by coordinate descent.

    Returns:
        ``(scale (B,), L (B, n) int32 in [0, 2·nmax-1])``.
    """
    x = np.ascontiguousarray(x, dtype=F32)
    scale = np.empty(x.shape[0], dtype=F32)
    L = np.empty(x.shape, dtype=np.int32)
    _q3_kernel(x, int(nmax), scale, L)
    return scale, L


@kernel
def _qkx_kernel(x, w, nmax, rmin, rdelta, nstep, use_mad, strict_degenerate, scale, the_min, L):
    B, n = x.shape
    La = np.empty(n, dtype=np.int32)
    for b in range(B):
        mn = x[b, 0]
        mx = x[b, 0]
        sum_w = w[b, 0]
        sum_x = sum_w * x[b, 0]
        for i in range(1, n):
            if x[b, i] < mn:
                mn = x[b, i]
            if x[b, i] > mx:
                mx = x[b, i]
            sum_w += w[b, i]
            sum_x += w[b, i] * x[b, i]
        if mn > _Z:
            mn = _Z
        if (mx == mn) if strict_degenerate else (mx <= mn):
            L[b, :] = 0
            scale[b] = _Z
            the_min[b] = -mn
            continue
        iscale = np.float32(nmax) / (mx - mn)
        sc = _ONE / iscale
        best = _Z
        for i in range(n):
            l = min(max(nearest_int(iscale * (x[b, i] - mn)), 0), nmax)
            L[b, i] = l
            diff = sc * np.float32(l) + mn - x[b, i]
            diff = abs(diff) if use_mad else diff * diff
            best += w[b, i] * diff
        for it in range(nstep + 1):
            isc = (rmin + rdelta * np.float32(it) + np.float32(nmax)) / (mx - mn)
            sum_l = _Z
            sum_l2 = _Z
            sum_xl = _Z
            for i in range(n):
                l = min(max(nearest_int(isc * (x[b, i] - mn)), 0), nmax)
                La[i] = l
                lf = np.float32(l)
                wl = w[b, i] * lf
                sum_l += wl
                sum_l2 += wl * lf
                sum_xl += wl * x[b, i]
            D = sum_w * sum_l2 - sum_l * sum_l
            if D > _Z:
                this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
                this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
                if this_min > _Z:
                    this_min = _Z
                    this_scale = sum_xl / sum_l2 if sum_l2 != _Z else _Z
                cur = _Z
                for i in range(n):
                    diff = this_scale * np.float32(La[i]) + this_min - x[b, i]
                    diff = abs(diff) if use_mad else diff * diff
                    cur += w[b, i] * diff
                if cur < best:
                    L[b, :] = La
                    best = cur
                    sc = this_scale
                    mn = this_min
        scale[b] = sc
        the_min[b] = -mn


def make_qkx_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool, strict_degenerate: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric (scale, min) search: ``make_qkx2_quants`` (``strict_degenerate``) and ``make_qkx3_quants``.

    The two differ only in the degenerate test (``max == min`` vs ``max <= min``) and in qkx3 defaulting the
    weights to x² — callers pass ``w`` explicitly. As in C, each trial's inverse scale uses the *current*
    min, which an accepted trial replaces.

    Returns:
        ``(scale (B,), the_min (B,) ≥ 0, L (B, n) int32 in [0, nmax])`` with ``x ≈ scale·L − the_min``.
    """
    x = np.ascontiguousarray(x, dtype=F32)
    B = x.shape[0]
    scale, the_min = np.empty(B, dtype=F32), np.empty(B, dtype=F32)
    L = np.empty(x.shape, dtype=np.int32)
    _qkx_kernel(x, _c(w, x), int(nmax), F32(rmin), F32(rdelta), int(nstep), bool(use_mad), bool(strict_degenerate),
                scale, the_min, L)
    return scale, the_min, L


@kernel
def _qp_kernel(x, w, nmax, scale, L):
    B, n = x.shape
    xl = np.empty(n, dtype=np.float32)
    wl = np.empty(n, dtype=np.float32)
    Ll = np.empty(n, dtype=np.int32)
    for b in range(B):
        mx = x[b, 0]
        for i in range(1, n):
            if x[b, i] > mx:
                mx = x[b, i]
        if mx < _Z:
            mx = _Z
        if mx < GROUP_MAX_EPS:
            L[b, :] = 0
            scale[b] = _Z
            continue
        iscale = np.float32(nmax) / mx
        sc = _ONE / iscale
        best = _Z
        for i in range(n):
            d = x[b, i] - sc * np.float32(nearest_int(iscale * x[b, i]))
            best += w[b, i] * d * d
        for it in range(-4, 5):
            if it == 0:
                continue
            isc = (_TENTH * np.float32(it) + np.float32(nmax)) / mx
            s = _ONE / isc
            mse = _Z
            for i in range(n):
                d = x[b, i] - s * np.float32(min(nearest_int(isc * x[b, i]), nmax))
                mse += w[b, i] * d * d
            if mse < best:
                best = mse
                iscale = isc
        sumlx = _Z
        suml2 = _Z
        for i in range(n):
            l = min(nearest_int(iscale * x[b, i]), nmax)
            L[b, i] = l
            lf = np.float32(l)
            sumlx += w[b, i] * x[b, i] * lf
            suml2 += w[b, i] * lf * lf
        for i in range(n):
            xl[i] = x[b, i]
            wl[i] = w[b, i]
            Ll[i] = L[b, i]
        sumlx, suml2 = _descend(xl, wl, Ll, sumlx, suml2, -(2 ** 30), nmax, True)
        for i in range(n):
            L[b, i] = Ll[i]
        scale[b] = sumlx / suml2 if suml2 > _Z else _Z


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_qp_quants``: quantize non-negative values (sub-block scales or mins) to ``[0, nmax]``.

    Returns:
        ``(scale (B,), L (B, n) int32)``.
    """
    x = np.ascontiguousarray(x, dtype=F32)
    scale = np.empty(x.shape[0], dtype=F32)
    L = np.empty(x.shape, dtype=np.int32)
    _qp_kernel(x, _c(qw, x), int(nmax), scale, L)
    return scale, L
