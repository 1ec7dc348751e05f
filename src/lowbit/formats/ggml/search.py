"""The scale searches of llama.cpp's reference quantizers, vectorized over blocks.

Each function mirrors one routine of ``ggml-quants.c`` (ggml-org/ggml, k-quants PR #1684 and the imatrix
PR #4861) operation for operation in float32, so that the chosen levels and scales are bit-identical. Every
per-block loop of the C code becomes an array operation over all blocks at once; sums over the elements of a
block stay sequential (:func:`seq_sum`), and data-dependent loops (the scale sweeps, coordinate descent)
become masked updates.

Symbols (as in the C code):
    x: ``(B, n)`` values of B blocks of n elements.   w: ``(B, n)`` weights of the weighted squared error.
    L: ``(B, n)`` integer levels.   nmax: number of positive levels.   scale, min: per block ``(B,)``.
"""

from __future__ import annotations

import numpy as np

from lowbit.formats.ggml.numerics import F32, first_absmax, nearest_int, safe_div, seq_sum

GROUP_MAX_EPS = F32(1e-15)


def _f(v: float | int) -> np.float32:
    return F32(v)


def make_qx_quants(x: np.ndarray, nmax: int, rmse_type: int, qw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search (``make_qx_quants``): levels ``l ∈ [-nmax, nmax-1]``, stored ``L = l + nmax``.

    Returns:
        ``(scale (B,), L (B, n) int32)``.
    """
    x = np.asarray(x, dtype=F32)
    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx).astype(F32)
    iscale = (_f(-nmax) / mx).astype(F32)

    def levels(isc: np.ndarray) -> np.ndarray:
        return np.clip(nearest_int(isc[:, None] * x), -nmax, nmax - 1)

    l = levels(iscale)
    if rmse_type == 0:
        L = np.where(zero[:, None], 0, l + nmax)
        return np.where(zero, F32(0), F32(1) / iscale).astype(F32), L
    if qw is not None:
        w = np.asarray(qw, dtype=F32)
    elif rmse_type == 1:
        w = x * x
    elif rmse_type == 2:
        w = np.ones_like(x)
    elif rmse_type == 3:
        w = np.abs(x)
    else:
        w = np.sqrt(np.abs(x))
    wx = w * x

    def sums(l: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lf = l.astype(F32)
        return seq_sum(wx * lf), seq_sum((w * lf) * lf)

    sumlx, suml2 = sums(l)
    scale = safe_div(sumlx, suml2)
    best = scale * sumlx
    L = l
    for i in range(-9, 10):
        if i == 0:
            continue
        isc = (-(_f(nmax) + _f(0.1) * _f(i)) / mx).astype(F32)
        li = levels(isc)
        slx, sl2 = sums(li)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        if better.any():
            L = np.where(better[:, None], li, L)
            scale = np.where(better, safe_div(slx, sl2), scale).astype(F32)
            best = np.where(better, scale * slx, best).astype(F32)
    L = np.where(zero[:, None], 0, L + nmax)
    return np.where(zero, F32(0), scale).astype(F32), L


def _descend(x: np.ndarray, w: np.ndarray, L: np.ndarray, sumlx: np.ndarray, suml2: np.ndarray,
             lo: int, hi: int, need_sl2_positive_first: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Five rounds of one-element-at-a-time coordinate descent on ``sumlx² / suml2`` (make_q3/qp_quants).

    The C loop stops a block after a round that accepted no change; a block is deterministic, so each round
    runs only on the blocks whose previous round changed something (same result, far fewer operations: most
    blocks settle after one or two rounds).
    """
    L, sumlx, suml2 = L.copy(), np.asarray(sumlx, dtype=F32).copy(), np.asarray(suml2, dtype=F32).copy()
    n = x.shape[1]
    idx = np.arange(x.shape[0])
    xa, wa, La, sx, s2 = x, w, L.copy(), sumlx.copy(), suml2.copy()
    for _ in range(5):
        changed = np.zeros(len(idx), dtype=bool)
        for i in range(n):
            wi, xi, Li = wa[:, i], xa[:, i], La[:, i].astype(F32)
            wxi = wi * xi
            slx = sx - wxi * Li
            sl2 = s2 - (wi * Li) * Li
            ok = (slx > 0) & (sl2 > 0) if need_sl2_positive_first else slx > 0
            new = np.clip(nearest_int(safe_div(xi * sl2, slx)), lo, hi)
            ok &= new != La[:, i]
            nf = new.astype(F32)
            slx2 = slx + wxi * nf
            sl22 = sl2 + (wi * nf) * nf
            acc = ok & (slx2 * slx2 * s2 > sx * sx * sl22)
            if not need_sl2_positive_first:
                acc &= sl22 > 0
            if acc.any():
                La[:, i] = np.where(acc, new, La[:, i])
                sx = np.where(acc, slx2, sx).astype(F32)
                s2 = np.where(acc, sl22, s2).astype(F32)
                changed |= acc
        L[idx], sumlx[idx], suml2[idx] = La, sx, s2
        if not changed.any():
            break
        idx = idx[changed]
        xa, wa, La, sx, s2 = xa[changed], wa[changed], La[changed], sx[changed], s2[changed]
    return L, sumlx, suml2


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants(..., do_rmse=true)``: x²-weighted symmetric levels refined by coordinate descent.

    Returns:
        ``(scale (B,), L (B, n) int32 in [0, 2·nmax-1])``.
    """
    x = np.asarray(x, dtype=F32)
    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx).astype(F32)
    iscale = (_f(-nmax) / mx).astype(F32)
    L = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
    w = x * x
    Lf = L.astype(F32)
    sumlx = seq_sum((w * x) * Lf)
    suml2 = seq_sum((w * Lf) * Lf)
    L, sumlx, suml2 = _descend(x, w, L, sumlx, suml2, -nmax, nmax - 1, need_sl2_positive_first=False)
    scale = np.where(suml2 > 0, safe_div(sumlx, suml2), F32(0)).astype(F32)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero[:, None], 0, L + nmax)


def make_qkx_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool, strict_degenerate: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric (scale, min) search: ``make_qkx2_quants`` (``strict_degenerate``) and ``make_qkx3_quants``.

    The two differ only in the degenerate test (``max == min`` vs ``max <= min``) and in qkx3 defaulting the
    weights to x² — callers pass ``w`` explicitly.

    Returns:
        ``(scale (B,), the_min (B,) ≥ 0, L (B, n) int32 in [0, nmax])`` with ``x ≈ scale·L − the_min``.
    """
    x = np.asarray(x, dtype=F32)
    w = np.asarray(w, dtype=F32)
    mn = x.min(axis=1)
    mx = x.max(axis=1)
    sum_w = seq_sum(w)
    sum_x = seq_sum(w * x)
    mn = np.where(mn > 0, F32(0), mn).astype(F32)
    degen = (mx == mn) if strict_degenerate else (mx <= mn)
    rng = np.where(degen, F32(1), mx - mn).astype(F32)
    xm = x - mn[:, None]

    def err(d: np.ndarray) -> np.ndarray:
        return np.abs(d) if use_mad else d * d

    iscale = (_f(nmax) / rng).astype(F32)
    scale = (F32(1) / iscale).astype(F32)
    L = np.clip(nearest_int(iscale[:, None] * xm), 0, nmax)
    best = seq_sum(w * err((scale[:, None] * L.astype(F32) + mn[:, None]) - x))
    for i in range(nstep + 1):
        # the C loop keeps using the *current* min, which an accepted step replaces
        rng = np.where(degen, F32(1), mx - mn).astype(F32)
        xm = x - mn[:, None]
        isc = ((_f(rmin) + _f(rdelta) * _f(i) + _f(nmax)) / rng).astype(F32)
        la = np.clip(nearest_int(isc[:, None] * xm), 0, nmax)
        lf = la.astype(F32)
        wl = w * lf
        sum_l = seq_sum(wl)
        sum_l2 = seq_sum(wl * lf)
        sum_xl = seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        this_scale = safe_div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = safe_div(sum_l2 * sum_x - sum_l * sum_xl, D)
        pos = this_min > 0
        this_scale = np.where(pos, safe_div(sum_xl, sum_l2), this_scale).astype(F32)
        this_min = np.where(pos, F32(0), this_min).astype(F32)
        cur = seq_sum(w * err((this_scale[:, None] * lf + this_min[:, None]) - x))
        better = ok & (cur < best)
        if better.any():
            L = np.where(better[:, None], la, L)
            best = np.where(better, cur, best).astype(F32)
            scale = np.where(better, this_scale, scale).astype(F32)
            mn = np.where(better, this_min, mn).astype(F32)
    L = np.where(degen[:, None], 0, L)
    scale = np.where(degen, F32(0), scale).astype(F32)
    return scale, (-mn).astype(F32), L


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_qp_quants``: quantize non-negative values (sub-block scales or mins) to ``[0, nmax]``.

    Returns:
        ``(scale (B,), L (B, n) int32)``.
    """
    x = np.asarray(x, dtype=F32)
    w = np.asarray(qw, dtype=F32)
    mx = x.max(axis=1)
    mx = np.maximum(mx, F32(0))
    zero = mx < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx).astype(F32)
    iscale = (_f(nmax) / mx).astype(F32)
    L0 = nearest_int(iscale[:, None] * x).astype(F32)
    scale = F32(1) / iscale
    d = x - scale[:, None] * L0
    best = seq_sum((w * d) * d)
    for i in range(-4, 5):
        if i == 0:
            continue
        isc = ((_f(0.1) * _f(i) + _f(nmax)) / mx).astype(F32)
        sc = F32(1) / isc
        l = np.minimum(nearest_int(isc[:, None] * x), nmax).astype(F32)
        d = x - sc[:, None] * l
        mse = seq_sum((w * d) * d)
        better = mse < best
        best = np.where(better, mse, best).astype(F32)
        iscale = np.where(better, isc, iscale).astype(F32)
    L = np.minimum(nearest_int(iscale[:, None] * x), nmax)
    Lf = L.astype(F32)
    sumlx = seq_sum((w * x) * Lf)
    suml2 = seq_sum((w * Lf) * Lf)
    L, sumlx, suml2 = _descend(x, w, L, sumlx, suml2, -(2**30), nmax, need_sl2_positive_first=True)
    scale = np.where(suml2 > 0, safe_div(sumlx, suml2), F32(0)).astype(F32)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero[:, None], 0, L)
