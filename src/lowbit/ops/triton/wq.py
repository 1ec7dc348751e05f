"""Triton kernels for ``lowbit::packed_linear``: W4A16 / W3A16 / W2A16 and look-up-table matmuls.

Layout: :mod:`lowbit.ops.repack` (bit planes packed along K, N contiguous; scales ``(G, N)``).

Three paths, chosen by the number of activation rows ``M``:

- ``M <= GEMV_MAX_M``: GEMV with split-K (:func:`_gemv3_kernel` and :func:`_gemv6_kernel`, chosen by
  :func:`gemv_config`). Each program reduces a ``BK``-slice of K
  for ``BN`` outputs and ``tl.atomic_add``-s its partial sums into an fp32 output (many CTAs even for small N:
  the M = 1 case is memory-bound, so the grid must cover every SM several times). The codes of a word are
  unpacked with constant shifts; an affine code is moved into the mantissa of 1.0 (``f = 1 + c/2^B``), so
  ``Σ_k x_k c_k = 2^B (Σ x f − Σ x)`` costs one shift, one and-or and one FMA per weight, and the group scale
  and zero point are applied once per (word, column): ``Σ_k x_k (c_k − z) s = s (Σ_k x_k c_k − z Σ_k x_k)``.
  Look-up tables (NF4/FP4 shared, SqueezeLLM per column): :func:`_gemv7_kernel` (the default for bf16/fp16 x,
  session 6) holds each table as byte planes in registers and looks up four codes per ``prmt.b32``, with every
  entry rounded once to x's dtype as the reference rounds its weights; v4 (fp32 x) reads them by a select tree
  on the code bits. The earlier ``_gemv_kernel`` (``gemv_config(v=2)``) is kept for the benchmark's comparison.
  v4 skips the shifts: each code is decoded exactly in place by :func:`_exact_code` (one LOP3 and one
  subtract), see ``benchmarks/NOTES_gpu.md`` session 3. v6 (:func:`_gemv6_kernel`, the default for affine
  4-bit weights with N >= 8192; v4 for the other affine ones) decodes and multiplies two codes per fp16x2
  instruction and, at N >= 16384, asks L2 for the word tiles 8 tiles ahead (session 5). Session 7 options (off by
  default, :func:`gemv_config`): ``tiled`` (v6/v7 read column-tiled copies of the planes, each program's K range one
  contiguous run; ``GEMV_TILED`` for tables and act-order), ``serial`` (split-K without the zeroed fp32 output and the
  cast: the last split of a column tile adds the others, :func:`_gemv_out`), ``pf0`` (v6: L2 prefetch of the first
  tiles before the x prologue).
- ``GEMV_MAX_M < M < BIG_M``: tiled ``tl.dot`` kernel that dequantizes a ``(BK, BN)`` tile in registers; for
  ``M <= MM4_MAX_M`` and affine 2/4-bit codes, :func:`_mm4_kernel` (one dot per code position) instead.
- ``M >= BIG_M``: dequantize to a bf16 ``(K, N)`` buffer with a Triton kernel (act-order rows scattered back
  to the weight's column order), then cuBLAS, in column chunks that stay in L2. ``path="mmt"`` is a fused
  kernel computed transposed (:func:`_mmt4_kernel`, :func:`_mmt_kernel`): measured 2–3× slower there on the
  H100 (session 4), kept for the benchmark, never chosen by default.

Measured choices and what they gained: ``benchmarks/NOTES_gpu.md``; numbers: ``results/gpu_kernels.md``.

Nothing here is compiled at import; Triton compiles on first call.
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from lowbit.ops.repack import PackedWeight, tiled_columns

log = logging.getLogger(__name__)

MODE_ID = {"affine": 0, "lut": 1, "lut_row": 2}
GEMV_MAX_M = 4
BIG_M = 1024
GEMV_PREFETCH = False  # v3 affine 2/4-bit prefetch of the next tile: no gain on the H100 (88.0 vs 92.5 µs)
MM_MAGIC = False  # mm path, affine 2/4-bit: bf16(128 + c) from the bits, scale after the dot: slower on the H100
DEQUANT_SEL = False  # large-M dequantize: select-tree tables were slower than L1 gathers there (NF4 0.76x vs 0.88x)
RS3 = True  # 3-bit dequantized tiles: each plane's words loaded once and unpacked (False: re-read per K row)
GEMV_PMIN = 12  # v4: codes at bit >= 12 skip the per-code subtract (H100: 66.4 -> 64.5 µs, graphs 56.7 -> 52.8)
DEQUANT_V4 = False  # v4 dequantize (exact in-place decode, per-code-position row stores): slower on the H100, 1520 vs 1420 µs
MM4_MAX_M = 64  # mm v4 up to here (one dot per code position: fewer decode instructions, more, smaller dots)
DEQUANT_CHUNK = 2048  # H100 sweep: 1563 µs vs 1591 µs unchunked at 2048×8192×28672
DEQUANT_TRANS = False  # large-M buffer holds rows of W (F.linear's layout) instead of columns of W^T
DEQUANT_OVERLAP = False  # large-M: dequantize chunk i + 1 on a side stream while cuBLAS multiplies chunk i
# GEMV v7 (byte-permute tables): one-warp programs of 32 columns, a split-K grid of >= 80 programs per SM (H100,
# session 6, 8192×28672, µs under graphs; sweep 1: BN 64-512, warps 1-4, split 4-16: more, smaller programs won;
# sweep 2: lut4 BN32 BK128 split 16 68.5 vs BN64 BK128 88.4 / BN64 BK64 69.3, lut3 BN32 split 32 53.6 vs BN64
# 54.3, NF4 BN32 BK64 split 16/32 74.6/74.1 vs BN64 79.1; BK 256 slower: 146-232)
LUT7_TILES = dict(BN=32, BK=128, num_warps=1, waves=80)
LUT7_F16T = True  # v7, per-column tables with bf16 x: bf16 entries held as scaled fp16 (cvt on the FMA pipe)
# Session 7 (H100, 8192×28672, M = 1, µs under CUDA graphs, two runs each): the column-tiled layout is faster for
# lut3 (52.26 / 52.1 vs 54.27 / 54.16), lut4 (67.25 / 66.94 vs 68.65 / 68.36) and int4 act-order (55.91 / 55.72 vs
# 57.94 / 57.61), the same for int4 asym/sym and NF4, slower for HQQ g64; it keeps a second copy of the weight
# (tiled_columns), so it is off by default. True: the default GEMV config reads tiled copies for look-up tables and
# act-order weights.
GEMV_TILED = False
MMT_TILES = dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=3, v=4)  # large-M fused, transposed


@triton.jit
def _plane3d(q_ptr, w0, offs_n, mask_n, N, KW, BK: tl.constexpr, B: tl.constexpr):
    """Codes of one bit plane for K-tile words ``[w0, w0 + BK·B/32)``: int32 ``(BK·B/32, 32/B, BN)``."""
    PER: tl.constexpr = 32 // B
    rows = w0 + tl.arange(0, BK // PER)
    m = (rows[:, None] < KW) & mask_n[None, :]
    w = tl.load(q_ptr + rows[:, None] * N + offs_n[None, :], mask=m, other=0)
    shifts = tl.arange(0, PER) * B
    return (w[:, None, :] >> shifts[None, :, None]) & ((1 << B) - 1)


@triton.jit
def _x3d(x_ptr, perm_ptr, k0, K, BK: tl.constexpr, PER: tl.constexpr, HAS_PERM: tl.constexpr):
    """Activations for K-tile ``[k0, k0 + BK)`` as fp32 ``(BK/PER, PER, 1)``."""
    kk = k0 + tl.arange(0, BK // PER)[:, None] * PER + tl.arange(0, PER)[None, :]
    mk = kk < K
    if HAS_PERM:
        src = tl.load(perm_ptr + kk, mask=mk, other=0)
    else:
        src = kk
    x = tl.load(x_ptr + src, mask=mk, other=0.0).to(tl.float32)
    return x[:, :, None]


@triton.jit
def _as_float(c):
    # float_bits(2^23 + c) - 2^23 == c exactly for 0 <= c < 2^23, without I2F.
    return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _codes2d(q4, q2, q1, k0, offs_n, mask_n, N, K, BK: tl.constexpr, BITS: tl.constexpr):
    """Full codes of a ``(BK, BN)`` tile, int32 (each word is re-read by the K rows that share it)."""
    offs_k = k0 + tl.arange(0, BK)
    mk = (offs_k[:, None] < K) & mask_n[None, :]
    if BITS == 4:
        w = tl.load(q4 + (offs_k[:, None] // 8) * N + offs_n[None, :], mask=mk, other=0)
        c = (w >> ((offs_k[:, None] % 8) * 4)) & 15
    elif BITS == 2:
        w = tl.load(q2 + (offs_k[:, None] // 16) * N + offs_n[None, :], mask=mk, other=0)
        c = (w >> ((offs_k[:, None] % 16) * 2)) & 3
    else:
        lo = tl.load(q2 + (offs_k[:, None] // 16) * N + offs_n[None, :], mask=mk, other=0)
        hi = tl.load(q1 + (offs_k[:, None] // 32) * N + offs_n[None, :], mask=mk, other=0)
        c = ((lo >> ((offs_k[:, None] % 16) * 2)) & 3) | (((hi >> (offs_k[:, None] % 32)) & 1) << 2)
    return c


@triton.jit
def _codes2d_rs(q_ptr, k0, offs_n, mask_n, N, KW, BK: tl.constexpr, B: tl.constexpr):
    """Codes of a single-plane ``(BK, BN)`` tile: each word loaded once, unpacked, reshaped."""
    BN: tl.constexpr = offs_n.shape[0]
    c = _plane3d(q_ptr, k0 // (32 // B), offs_n, mask_n, N, KW, BK, B)
    return tl.reshape(c, (BK, BN))


@triton.jit
def _dequant_tile(q4, q2, q1, scale, zero, cb, k0, offs_n, mask_n, N, K,
                  BK: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr,
                  RS: tl.constexpr = False, SEL: tl.constexpr = False):
    """fp32 ``(BK, BN)`` tile of W^T (requires GROUP % BK == 0, so the tile lies in one group)."""
    if RS and BITS == 4:
        c = _codes2d_rs(q4, k0, offs_n, mask_n, N, (K + 7) // 8, BK, 4)
    elif RS and BITS == 2:
        c = _codes2d_rs(q2, k0, offs_n, mask_n, N, (K + 15) // 16, BK, 2)
    elif RS and BITS == 3 and BK >= 32:  # both bit planes' words loaded once each (not once per K row)
        c = _codes2d_rs(q2, k0, offs_n, mask_n, N, (K + 15) // 16, BK, 2) | \
            (_codes2d_rs(q1, k0, offs_n, mask_n, N, (K + 31) // 32, BK, 1) << 2)
    else:
        c = _codes2d(q4, q2, q1, k0, offs_n, mask_n, N, K, BK, BITS)
    g = k0 // GROUP
    ms = mask_n & (k0 < K)  # a split may end past K: never read a group that does not exist
    if MODE == 0:
        s = tl.load(scale + g * N + offs_n, mask=ms, other=0.0).to(tl.float32)
        z = tl.load(zero + g * N + offs_n, mask=ms, other=0.0).to(tl.float32)
        w = (_as_float(c) - z[None, :]) * s[None, :]
    elif MODE == 1:
        s = tl.load(scale + g * N + offs_n, mask=ms, other=0.0).to(tl.float32)
        if SEL:
            w = _table_lookup(c, cb, offs_n, mask_n, BITS, False) * s[None, :]
        else:
            w = tl.load(cb + c).to(tl.float32) * s[None, :]
    else:
        if SEL:
            w = _table_lookup(c, cb, offs_n, mask_n, BITS, True)
        else:
            w = tl.load(cb + offs_n[None, :] * (1 << BITS) + c, mask=mask_n[None, :], other=0.0).to(tl.float32)
    return w


@triton.jit
def _gemv_program(x_ptr, N, stride_xm, BN: tl.constexpr):
    """A GEMV program's place: column tile (grid axis 0), K split (axis 1), row of x (axis 2); its columns, their
    bounds mask and its row of x."""
    pid_n = tl.program_id(0)
    m = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    return pid_n, tl.program_id(1), m, offs_n, offs_n < N, x_ptr + m * stride_xm


@triton.jit
def _gemv_kernel(x_ptr, out_ptr, q4, q2, q1, scale, zero, cb, perm, N, K, KW4, KW2, KW1, stride_xm,
                 BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr, HAS_PERM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, K_PER_PROG: tl.constexpr, SPLIT_ATOMIC: tl.constexpr):
    # Partial sums stay 2-D (word, column) across the K loop: the sum over the codes of one word is
    # in-thread, and the only cross-thread reduction happens once, after the loop.
    pid_n, pid_k, m, offs_n, mask_n, xr = _gemv_program(x_ptr, N, stride_xm, BN)
    P0: tl.constexpr = 8 if BITS == 4 else 16
    acc = tl.zeros((BK // P0, BN), dtype=tl.float32)
    acc1 = tl.zeros((BK // 32, BN), dtype=tl.float32)
    acc2 = tl.zeros((BK, BN), dtype=tl.float32)
    kstart = pid_k * K_PER_PROG
    for kt in range(0, K_PER_PROG, BK):
        k0 = kstart + kt
        g = k0 // GROUP
        ms = mask_n & (k0 < K)  # a split may end past K: never read a group that does not exist
        if MODE == 0:
            s = tl.load(scale + g * N + offs_n, mask=ms, other=0.0).to(tl.float32)
            z = tl.load(zero + g * N + offs_n, mask=ms, other=0.0).to(tl.float32)
            if BITS == 4:
                c = _as_float(_plane3d(q4, k0 // 8, offs_n, mask_n, N, KW4, BK, 4))
                xv = _x3d(xr, perm, k0, K, BK, 8, HAS_PERM)
            else:
                c = _as_float(_plane3d(q2, k0 // 16, offs_n, mask_n, N, KW2, BK, 2))
                xv = _x3d(xr, perm, k0, K, BK, 16, HAS_PERM)
            acc += s[None, :] * (tl.sum(c * xv, axis=1) - z[None, :] * tl.sum(xv, axis=1))
            if BITS == 3:
                c1 = _as_float(_plane3d(q1, k0 // 32, offs_n, mask_n, N, KW1, BK, 1))
                x1 = _x3d(xr, perm, k0, K, BK, 32, HAS_PERM)
                acc1 += (4.0 * s[None, :]) * tl.sum(c1 * x1, axis=1)
        elif BITS == 3:
            w = _dequant_tile(q4, q2, q1, scale, zero, cb, k0, offs_n, mask_n, N, K, BK, BITS, GROUP, MODE)
            kk = k0 + tl.arange(0, BK)
            mk = kk < K
            if HAS_PERM:
                src = tl.load(perm + kk, mask=mk, other=0)
            else:
                src = kk
            xv2 = tl.load(xr + src, mask=mk, other=0.0).to(tl.float32)
            acc2 += w * xv2[:, None]
        else:
            if BITS == 4:
                c = _plane3d(q4, k0 // 8, offs_n, mask_n, N, KW4, BK, 4)
                xv = _x3d(xr, perm, k0, K, BK, 8, HAS_PERM)
            else:
                c = _plane3d(q2, k0 // 16, offs_n, mask_n, N, KW2, BK, 2)
                xv = _x3d(xr, perm, k0, K, BK, 16, HAS_PERM)
            if MODE == 1:
                s = tl.load(scale + g * N + offs_n, mask=ms, other=0.0).to(tl.float32)
                v = tl.load(cb + c).to(tl.float32)
                acc += s[None, :] * tl.sum(v * xv, axis=1)
            else:
                v = tl.load(cb + offs_n[None, None, :] * (1 << BITS) + c, mask=mask_n[None, None, :],
                            other=0.0).to(tl.float32)
                acc += tl.sum(v * xv, axis=1)
    total = tl.sum(acc, axis=0)
    if MODE == 0 and BITS == 3:
        total += tl.sum(acc1, axis=0)
    if MODE != 0 and BITS == 3:
        total = tl.sum(acc2, axis=0)
    if SPLIT_ATOMIC:
        tl.atomic_add(out_ptr + m * N + offs_n, total, mask=mask_n, sem="relaxed")
    else:
        tl.store(out_ptr + m * N + offs_n, total.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _hm_load(q_ptr, k0, k_end, offs_n, mask_n, N, KW, NW: tl.constexpr, B: tl.constexpr):
    """Words ``(NW, BN)`` of one bit plane for the K-tile at ``k0`` (zero past ``k_end`` or the plane's end)."""
    PER: tl.constexpr = 32 // B
    rows = k0 // PER + tl.arange(0, NW)
    ok = (rows < KW) & (rows * PER < k_end)
    return tl.load(q_ptr + rows[:, None] * N + offs_n[None, :], mask=ok[:, None] & mask_n[None, :], other=0,
                   eviction_policy="evict_first")


@triton.jit
def _hm_dot(w, xr, perm, k0, K, NW: tl.constexpr, B: tl.constexpr, HAS_PERM: tl.constexpr):
    """One bit plane of a K-tile against x, without integer-to-float conversion or a float subtract.

    Code ``i`` of a word is moved to mantissa bits ``[23 - B, 23)`` of 1.0, giving ``f = 1 + c / 2^B`` with one
    shift and one and-or, so ``Σ_i x_i c_i = 2^B (A - X)`` with ``A = Σ x_i f_i`` and ``X = Σ x_i`` (per word).
    Returns ``A (NW, BN)`` and ``X (NW,)`` in fp32.
    """
    PER: tl.constexpr = 32 // B
    rows = k0 // PER + tl.arange(0, NW)
    A = tl.zeros(w.shape, dtype=tl.float32)
    X = tl.zeros((NW,), dtype=tl.float32)
    MASK: tl.constexpr = ((1 << B) - 1) << (23 - B)
    for i in tl.static_range(PER):
        kk = rows * PER + i
        mk = kk < K
        if HAS_PERM:
            src = tl.load(perm + kk, mask=mk, other=0)
        else:
            src = kk
        xi = tl.load(xr + src, mask=mk, other=0.0).to(tl.float32)
        if 23 - B - B * i >= 0:
            v = w << (23 - B - B * i)
        else:
            v = w >> (B * i + B - 23)
        f = ((v & MASK) | 0x3F800000).to(tl.float32, bitcast=True)
        A += f * xi[:, None]
        X += xi
    return A, X


@triton.jit
def _exact_code(v, e23, P: tl.constexpr, B: tl.constexpr, SUB: tl.constexpr = True):
    """The ``B``-bit code at bits ``[P, P + B)`` of ``v`` (``P + B <= 23``) as an exact float, decoded in place:
    OR-ing in the exponent of ``2^(23 - P)`` makes a float whose unit in the last place is ``2^-P``, i.e.
    ``2^(23 - P) + c``; ``SUB`` takes ``2^(23 - P)`` off. ``e23`` holds 2^23's bits at run time, so the
    mask-and-or is one LOP3 (two immediates would take two)."""
    f = ((v & (((1 << B) - 1) << P)) | (e23 - (P << 23))).to(tl.float32, bitcast=True)
    if SUB:
        f = f - float(1 << (23 - P))
    return f


@triton.jit
def _ex_dot(w, xr, perm, k0, K, e23, NW: tl.constexpr, B: tl.constexpr, HAS_PERM: tl.constexpr,
            EVEN: tl.constexpr, PMIN: tl.constexpr = 24, xs=None, xb=None, XPRE: tl.constexpr = False):
    """One bit plane of a K-tile against x with exact float codes and one integer op per code (GEMV v4).

    A code at bits ``[p, p + B)`` with ``p + B <= 23`` is masked in place; OR-ing in the exponent of ``2^(23 - p)``
    makes a float whose unit in the last place is ``2^-p``, so its value is ``2^(23 - p) + c`` and one float
    subtract gives ``c`` exactly: no shift per code (one shift by 9 per word brings the codes above bit 22 down
    to bits ``B·i - 9``), and no cancellation. With ``PMIN < 24``, codes at ``p >= PMIN`` skip the subtract:
    ``Σ x (2^(23-p) + c)`` is accumulated and ``Σ x 2^(23-p)`` (per word, the same for every column) taken off
    once per word, losing at most ``23 - p - B`` bits of that word's partial sum to cancellation.
    Returns ``A = Σ x_i c_i`` ``(NW, BN)`` and ``X = Σ x_i`` ``(NW,)`` in fp32.
    """
    PER: tl.constexpr = 32 // B
    LOW: tl.constexpr = 23 // B  # codes that lie in bits 0..22 are decoded in place
    rows = k0 // PER + tl.arange(0, NW)
    A = tl.zeros(w.shape, dtype=tl.float32)
    X = tl.zeros((NW,), dtype=tl.float32)
    XB = tl.zeros((NW,), dtype=tl.float32)
    hi = w >> 9  # the codes above bit 22 land at bits B·i - 9 <= 23 - B (sign copies above bit 22 are masked)
    for i in tl.static_range(PER):
        kk = rows * PER + i
        if HAS_PERM:  # (v5, XPRE: x is already fp32 and in kernel order, see :func:`_xprep_kernel`)
            src = tl.load(perm + kk) if EVEN else tl.load(perm + kk, mask=kk < K, other=0)
        else:
            src = kk
        if EVEN:
            xi = tl.load(xr + src).to(tl.float32)
        else:
            xi = tl.load(xr + src, mask=kk < K, other=0.0).to(tl.float32)
        if i < LOW:
            v = w
        else:
            v = hi
        if B * i - 9 * (i >= LOW) >= PMIN:  # code at bit B·i - 9·(i >= LOW)
            A += _exact_code(v, e23, B * i - 9 * (i >= LOW), B, False) * xi[:, None]
            if not XPRE:
                XB += xi * float(1 << (23 - (B * i - 9 * (i >= LOW))))
        else:
            A += _exact_code(v, e23, B * i - 9 * (i >= LOW), B) * xi[:, None]
        if not XPRE:
            X += xi
    if XPRE:
        if EVEN:
            X = tl.load(xs + rows)
            XB = tl.load(xb + rows)
        else:
            X = tl.load(xs + rows, mask=rows * PER < K, other=0.0)
            XB = tl.load(xb + rows, mask=rows * PER < K, other=0.0)
    if PMIN < 24:
        A -= XB[:, None]
    return A, X


@triton.jit
def _xprep_kernel(x_ptr, perm, xf_ptr, xs_ptr, xb_ptr, out_ptr, K, KW, N, stride_xm, B: tl.constexpr,
                  PMIN: tl.constexpr, HAS_PERM: tl.constexpr, BW: tl.constexpr, BZ: tl.constexpr,
                  ZERO: tl.constexpr):
    """GEMV v5's per-call preparation of x (one row per ``program_id(1)``): ``xf`` = x in fp32 and kernel order
    (act-order applied), ``xs[w]`` = Σ of word ``w``'s x values, ``xb[w]`` = Σ x·2^(23−q) over the codes whose
    subtract :func:`_ex_dot` skips (``q >= PMIN``); and it zeroes the split-K output (the memset it replaces)."""
    PER: tl.constexpr = 32 // B
    LOW: tl.constexpr = 23 // B
    m = tl.program_id(1)
    wd = tl.program_id(0) * BW + tl.arange(0, BW)
    i = tl.arange(0, PER)
    kk = wd[:, None] * PER + i[None, :]
    mk = kk < K
    if HAS_PERM:
        src = tl.load(perm + kk, mask=mk, other=0)
    else:
        src = kk
    x = tl.load(x_ptr + m * stride_xm + src, mask=mk, other=0.0).to(tl.float32)
    tl.store(xf_ptr + m * K + kk, x, mask=mk)
    q = B * i - 9 * (i >= LOW)
    coef = tl.where(q >= PMIN, (1 << tl.maximum(23 - q, 0)).to(tl.float32), 0.0)
    tl.store(xs_ptr + m * KW + wd, tl.sum(x, axis=1), mask=wd < KW)
    tl.store(xb_ptr + m * KW + wd, tl.sum(x * coef[None, :], axis=1), mask=wd < KW)
    if ZERO:
        zo = tl.program_id(0) * BZ + tl.arange(0, BZ)
        tl.store(out_ptr + m * N + zo, tl.zeros((BZ,), dtype=tl.float32), mask=zo < N)


@triton.jit
def _hm_plane(q_ptr, xr, perm, k0, offs_n, mask_n, N, K, KW, NW: tl.constexpr, B: tl.constexpr,
              HAS_PERM: tl.constexpr, DEC: tl.constexpr = 0, EVEN: tl.constexpr = False, e23=0,
              PMIN: tl.constexpr = 24, xs=None, xb=None, XPRE: tl.constexpr = False):
    """Load one bit plane of a K-tile and dot it with x: ``DEC=0`` mantissa decode (v3, ``Σ x c = 2^B (A - X)``),
    ``DEC=1`` exact exponent decode (v4, ``A = Σ x c``)."""
    if EVEN:
        PER: tl.constexpr = 32 // B
        rows = k0 // PER + tl.arange(0, NW)
        w = tl.load(q_ptr + rows[:, None] * N + offs_n[None, :], eviction_policy="evict_first")
    else:
        w = _hm_load(q_ptr, k0, K, offs_n, mask_n, N, KW, NW, B)
    if DEC == 1:
        return _ex_dot(w, xr, perm, k0, K, e23, NW, B, HAS_PERM, EVEN, PMIN, xs, xb, XPRE)
    else:
        return _hm_dot(w, xr, perm, k0, K, NW, B, HAS_PERM)


@triton.jit
def _select16(c, e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15):
    """``table[c]`` for a 16-entry table held in registers: a 4-level select tree on the bits of ``c``."""
    b = (c & 1) != 0
    t0 = tl.where(b, e1, e0)
    t1 = tl.where(b, e3, e2)
    t2 = tl.where(b, e5, e4)
    t3 = tl.where(b, e7, e6)
    t4 = tl.where(b, e9, e8)
    t5 = tl.where(b, e11, e10)
    t6 = tl.where(b, e13, e12)
    t7 = tl.where(b, e15, e14)
    b = (c & 2) != 0
    u0 = tl.where(b, t1, t0)
    u1 = tl.where(b, t3, t2)
    u2 = tl.where(b, t5, t4)
    u3 = tl.where(b, t7, t6)
    b = (c & 4) != 0
    v0 = tl.where(b, u1, u0)
    v1 = tl.where(b, u3, u2)
    return tl.where((c & 8) != 0, v1, v0)


@triton.jit
def _select8(c, e0, e1, e2, e3, e4, e5, e6, e7):
    b = (c & 1) != 0
    t0 = tl.where(b, e1, e0)
    t1 = tl.where(b, e3, e2)
    t2 = tl.where(b, e5, e4)
    t3 = tl.where(b, e7, e6)
    b = (c & 2) != 0
    u0 = tl.where(b, t1, t0)
    u1 = tl.where(b, t3, t2)
    return tl.where((c & 4) != 0, u1, u0)


@triton.jit
def _entry(cb, offs_n, mask_n, j: tl.constexpr, NC: tl.constexpr, ROW: tl.constexpr):
    if ROW:
        return tl.load(cb + offs_n * NC + j, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    else:
        return tl.load(cb + j).to(tl.float32)


@triton.jit
def _lut_tile(q4, q2, q1, cb, xr, perm, k0, offs_n, mask_n, N, K, KW4, KW2, KW1, NC32: tl.constexpr,
              BITS: tl.constexpr, ROW: tl.constexpr, HAS_PERM: tl.constexpr):
    """``Σ_k x_k table[c_k]`` over a K-tile of ``NC32`` chunks of 32 codes, table in registers: ``(NC32, BN)``."""
    BN: tl.constexpr = offs_n.shape[0]
    NC: tl.constexpr = 1 << BITS
    e0 = _entry(cb, offs_n, mask_n, 0, NC, ROW)
    e1 = _entry(cb, offs_n, mask_n, 1, NC, ROW)
    e2 = _entry(cb, offs_n, mask_n, 2, NC, ROW)
    e3 = _entry(cb, offs_n, mask_n, 3, NC, ROW)
    e4 = _entry(cb, offs_n, mask_n, 4, NC, ROW)
    e5 = _entry(cb, offs_n, mask_n, 5, NC, ROW)
    e6 = _entry(cb, offs_n, mask_n, 6, NC, ROW)
    e7 = _entry(cb, offs_n, mask_n, 7, NC, ROW)
    chunk = k0 // 32 + tl.arange(0, NC32)
    mrow = mask_n[None, :]
    acc = tl.zeros((NC32, BN), dtype=tl.float32)
    if BITS == 4:
        e8 = _entry(cb, offs_n, mask_n, 8, NC, ROW)
        e9 = _entry(cb, offs_n, mask_n, 9, NC, ROW)
        e10 = _entry(cb, offs_n, mask_n, 10, NC, ROW)
        e11 = _entry(cb, offs_n, mask_n, 11, NC, ROW)
        e12 = _entry(cb, offs_n, mask_n, 12, NC, ROW)
        e13 = _entry(cb, offs_n, mask_n, 13, NC, ROW)
        e14 = _entry(cb, offs_n, mask_n, 14, NC, ROW)
        e15 = _entry(cb, offs_n, mask_n, 15, NC, ROW)
        for h in tl.static_range(4):
            rows = chunk * 4 + h
            w = tl.load(q4 + rows[:, None] * N + offs_n[None, :], mask=(rows[:, None] < KW4) & mrow, other=0,
                        eviction_policy="evict_first")
            for i in tl.static_range(8):
                kk = rows * 8 + i
                mk = kk < K
                if HAS_PERM:
                    src = tl.load(perm + kk, mask=mk, other=0)
                else:
                    src = kk
                xi = tl.load(xr + src, mask=mk, other=0.0).to(tl.float32)
                c = (w >> (4 * i)) & 15
                acc += _select16(c, e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15) * xi[:, None]
    else:
        hi = tl.load(q1 + chunk[:, None] * N + offs_n[None, :], mask=(chunk[:, None] < KW1) & mrow, other=0,
                     eviction_policy="evict_first")
        for h in tl.static_range(2):
            rows = chunk * 2 + h
            lo = tl.load(q2 + rows[:, None] * N + offs_n[None, :], mask=(rows[:, None] < KW2) & mrow, other=0,
                         eviction_policy="evict_first")
            for i in tl.static_range(16):
                kk = rows * 16 + i
                mk = kk < K
                if HAS_PERM:
                    src = tl.load(perm + kk, mask=mk, other=0)
                else:
                    src = kk
                xi = tl.load(xr + src, mask=mk, other=0.0).to(tl.float32)
                if 16 * h + i >= 2:
                    c = ((lo >> (2 * i)) & 3) | ((hi >> (16 * h + i - 2)) & 4)
                else:
                    c = ((lo >> (2 * i)) & 3) | ((hi << (2 - 16 * h - i)) & 4)
                acc += _select8(c, e0, e1, e2, e3, e4, e5, e6, e7) * xi[:, None]
    return acc


@triton.jit
def _table_lookup(c, cb, offs_n, mask_n, BITS: tl.constexpr, ROW: tl.constexpr):
    """``table[c]`` (shared table, or one per column when ``ROW``) through a select tree, table in registers."""
    NC: tl.constexpr = 1 << BITS
    e0 = _entry(cb, offs_n, mask_n, 0, NC, ROW)
    e1 = _entry(cb, offs_n, mask_n, 1, NC, ROW)
    e2 = _entry(cb, offs_n, mask_n, 2, NC, ROW)
    e3 = _entry(cb, offs_n, mask_n, 3, NC, ROW)
    e4 = _entry(cb, offs_n, mask_n, 4, NC, ROW)
    e5 = _entry(cb, offs_n, mask_n, 5, NC, ROW)
    e6 = _entry(cb, offs_n, mask_n, 6, NC, ROW)
    e7 = _entry(cb, offs_n, mask_n, 7, NC, ROW)
    if BITS == 4:
        e8 = _entry(cb, offs_n, mask_n, 8, NC, ROW)
        e9 = _entry(cb, offs_n, mask_n, 9, NC, ROW)
        e10 = _entry(cb, offs_n, mask_n, 10, NC, ROW)
        e11 = _entry(cb, offs_n, mask_n, 11, NC, ROW)
        e12 = _entry(cb, offs_n, mask_n, 12, NC, ROW)
        e13 = _entry(cb, offs_n, mask_n, 13, NC, ROW)
        e14 = _entry(cb, offs_n, mask_n, 14, NC, ROW)
        e15 = _entry(cb, offs_n, mask_n, 15, NC, ROW)
        return _select16(c, e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15)
    else:
        return _select8(c, e0, e1, e2, e3, e4, e5, e6, e7)


@triton.jit
def _group_scale_zero(scale, zero, g, N, offs_n, ms, EVEN: tl.constexpr):
    """Group ``g``'s scale and zero point for columns ``offs_n`` in fp32 (``ms`` masks them unless ``EVEN``)."""
    if EVEN:
        return tl.load(scale + g * N + offs_n).to(tl.float32), tl.load(zero + g * N + offs_n).to(tl.float32)
    return (tl.load(scale + g * N + offs_n, mask=ms, other=0.0).to(tl.float32),
            tl.load(zero + g * N + offs_n, mask=ms, other=0.0).to(tl.float32))


@triton.jit
def _gemv3_kernel(x_ptr, out_ptr, q4, q2, q1, scale, zero, cb, perm, N, K, KW4, KW2, KW1, stride_xm, E23,
                  BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr, HAS_PERM: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr, K_PER_PROG: tl.constexpr, SPLIT_ATOMIC: tl.constexpr,
                  PF: tl.constexpr = False, DEC: tl.constexpr = 0, EVEN: tl.constexpr = False,
                  PMIN: tl.constexpr = 24, xs_ptr=None, xb_ptr=None, XPRE: tl.constexpr = False,
                  STAGES: tl.constexpr = 1, TMA: tl.constexpr = False):
    """GEMV v3: codes unpacked with constant shifts (``tl.static_range``), affine codes decoded by
    :func:`_hm_plane`, look-up tables held in registers (:func:`_select16`) instead of gathered from memory.
    ``STAGES > 1`` software-pipelines the K loop (``tl.range(num_stages=...)``): the word tiles of the next
    ``STAGES - 1`` iterations are copied to shared memory asynchronously (cp.async) while this one is decoded;
    a plain ``range`` with the launch's ``num_stages`` is not pipelined for a loop without a dot. ``TMA``
    (affine 2/4-bit, v4 decode): ``q4``/``q2`` is a host-made tensor descriptor of the word plane with block
    ``(BK·B/32, BN)``, so the tiles are bulk copies (pipelined over ``STAGES`` too), zero past the plane's end."""
    pid_n, pid_k, m, offs_n, mask_n, xr = _gemv_program(x_ptr, N, stride_xm, BN)
    P0: tl.constexpr = 8 if BITS == 4 else 16
    acc = tl.zeros((BK // P0, BN), dtype=tl.float32)
    acc1 = tl.zeros((BK // 32, BN), dtype=tl.float32)
    kstart = pid_k * K_PER_PROG
    k_end = kstart + K_PER_PROG
    QP = q4 if BITS == 4 else q2
    KWP = KW4 if BITS == 4 else KW2
    BP: tl.constexpr = 4 if BITS == 4 else 2
    PFX: tl.constexpr = PF and MODE == 0 and BITS != 3
    if XPRE:  # this row's word sums of x (v5)
        xsr = xs_ptr + m * KWP
        xbr = xb_ptr + m * KWP
    else:
        xsr = xs_ptr
        xbr = xb_ptr
    if PFX:  # software prefetch: the next tile's words are in flight while this tile is computed
        w_next = _hm_load(QP, kstart, k_end, offs_n, mask_n, N, KWP, BK // P0, BP)
    for kt in tl.range(0, K_PER_PROG, BK, num_stages=STAGES):
        k0 = kstart + kt
        g = k0 // GROUP
        ms = mask_n & (k0 < K)  # a split may end past K: never read a group that does not exist
        if PFX:
            w = w_next
            w_next = _hm_load(QP, k0 + BK, k_end, offs_n, mask_n, N, KWP, BK // P0, BP)
            s = tl.load(scale + g * N + offs_n, mask=ms, other=0.0).to(tl.float32)
            z = tl.load(zero + g * N + offs_n, mask=ms, other=0.0).to(tl.float32)
            if DEC == 1:  # v4 decode on the prefetched words
                A, X = _ex_dot(w, xr, perm, k0, K, E23, BK // P0, BP, HAS_PERM, EVEN, PMIN)
                acc += s[None, :] * (A - z[None, :] * X[:, None])
            else:
                A, X = _hm_dot(w, xr, perm, k0, K, BK // P0, BP, HAS_PERM)
                acc += s[None, :] * ((1 << BP) * A - ((1 << BP) + z[None, :]) * X[:, None])
        elif TMA:  # affine 2/4-bit, v4 decode, the word tile by bulk copy
            s, z = _group_scale_zero(scale, zero, g, N, offs_n, ms, EVEN)
            w = QP.load([k0 // P0, pid_n * BN])
            A, X = _ex_dot(w, xr, perm, k0, K, E23, BK // P0, BP, HAS_PERM, EVEN, PMIN)
            acc += s[None, :] * (A - z[None, :] * X[:, None])
        elif MODE == 0:
            s, z = _group_scale_zero(scale, zero, g, N, offs_n, ms, EVEN)
            if BITS == 4:
                A, X = _hm_plane(q4, xr, perm, k0, offs_n, mask_n, N, K, KW4, BK // 8, 4, HAS_PERM, DEC, EVEN, E23,
                                 PMIN, xsr, xbr, XPRE)
                if DEC == 1:
                    acc += s[None, :] * (A - z[None, :] * X[:, None])
                else:
                    acc += s[None, :] * (16.0 * A - (16.0 + z[None, :]) * X[:, None])
            else:
                A, X = _hm_plane(q2, xr, perm, k0, offs_n, mask_n, N, K, KW2, BK // 16, 2, HAS_PERM, DEC, EVEN, E23,
                                 PMIN, xsr, xbr, XPRE)
                if DEC == 1:
                    acc += s[None, :] * (A - z[None, :] * X[:, None])
                else:
                    acc += s[None, :] * (4.0 * A - (4.0 + z[None, :]) * X[:, None])
                if BITS == 3:  # high bit plane: code += 4 · bit
                    A1, X1 = _hm_plane(q1, xr, perm, k0, offs_n, mask_n, N, K, KW1, BK // 32, 1, HAS_PERM, DEC,
                                       EVEN, E23, 24)  # bit codes: no skipped subtract (the largest cancellation)
                    if DEC == 1:
                        acc1 += s[None, :] * (4.0 * A1)
                    else:
                        acc1 += s[None, :] * (8.0 * (A1 - X1[:, None]))
        elif MODE == 1:  # scale per 32-code chunk: the tile may span several groups
            chunk = k0 // 32 + tl.arange(0, BK // 32)
            s2 = tl.load(scale + ((chunk * 32) // GROUP)[:, None] * N + offs_n[None, :],
                         mask=(chunk[:, None] * 32 < K) & mask_n[None, :], other=0.0).to(tl.float32)
            acc1 += s2 * _lut_tile(q4, q2, q1, cb, xr, perm, k0, offs_n, mask_n, N, K, KW4, KW2, KW1,
                                           BK // 32, BITS, False, HAS_PERM)
        else:
            acc1 += _lut_tile(q4, q2, q1, cb, xr, perm, k0, offs_n, mask_n, N, K, KW4, KW2, KW1, BK // 32, BITS,
                              True, HAS_PERM)
    total = tl.sum(acc1, axis=0)
    if MODE == 0:
        total += tl.sum(acc, axis=0)
    if SPLIT_ATOMIC:
        tl.atomic_add(out_ptr + m * N + offs_n, total, mask=mask_n, sem="relaxed")
    else:
        tl.store(out_ptr + m * N + offs_n, total.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _xrow(xr, perm, rows, i: tl.constexpr, K, PER: tl.constexpr, EVEN: tl.constexpr, HAS_PERM: tl.constexpr):
    """x at position ``i`` of each word row ``rows`` (K index ``PER·row + i``, through act-order's ``perm``), fp32."""
    kk = rows * PER + i
    if HAS_PERM:
        src = tl.load(perm + kk) if EVEN else tl.load(perm + kk, mask=kk < K, other=0)
    else:
        src = kk
    if EVEN:
        return tl.load(xr + src).to(tl.float32)
    return tl.load(xr + src, mask=kk < K, other=0.0).to(tl.float32)


@triton.jit
def _prefetch_l2(ptr, ok):
    """``prefetch.global.L2`` of each address where ``ok`` is nonzero (a hint: nothing is returned or waited for)."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
        "=r,l,r", [ptr, ok], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _f16x2(lo, hi):
    """Two fp32 tensors -> one int32 tensor of packed fp16 pairs (``lo`` in the low half), round to nearest."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _word_dot_f16x2(w, p0, p1, p2, p3):
    """``Σ_i c_i x_i`` over the eight 4-bit codes of each word ``w``, two codes per fp16x2 instruction.

    One LOP3 places codes ``i`` and ``i + 4`` in the two halves of an fp16 ``1024 + c`` (codes 1, 3, 5, 7 as
    ``1024 + 16 c``, hence x / 16 in ``p1``, ``p3``); one HSUB2 gives the exact codes; one HFMA2 each adds
    their products with ``x`` (``p0 = (x0, x4)``, ``p1 = (x1, x5) / 16``, ``p2 = (x2, x6)``,
    ``p3 = (x3, x7) / 16``, packed fp16); four codes are summed in each half, then both halves in fp32.
    16 instructions for 8 weights (GEMV v4: ~37)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 t0, t1, t2, t3, w8, k, a;
        .reg .b16 l, h;
        .reg .f32 fl, fh;
        mov.b32 k, 0x64006400;
        lop3.b32 t0, $1, 0x000F000F, k, 0xEA;
        lop3.b32 t1, $1, 0x00F000F0, k, 0xEA;
        shr.u32 w8, $1, 8;
        lop3.b32 t2, w8, 0x000F000F, k, 0xEA;
        lop3.b32 t3, w8, 0x00F000F0, k, 0xEA;
        sub.f16x2 t0, t0, k;
        sub.f16x2 t1, t1, k;
        sub.f16x2 t2, t2, k;
        sub.f16x2 t3, t3, k;
        mul.rn.f16x2 a, t0, $2;
        fma.rn.f16x2 a, t1, $3, a;
        fma.rn.f16x2 a, t2, $4, a;
        fma.rn.f16x2 a, t3, $5, a;
        mov.b32 {l, h}, a;
        cvt.f32.f16 fl, l;
        cvt.f32.f16 fh, h;
        add.f32 $0, fl, fh;
        }""", "=f,r,r,r,r,r", [w, p0, p1, p2, p3], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _gemv_out(out_ptr, total, ws, cnt, m, pid_n, pid_k, offs_n, mask_n, N, SPLIT_ATOMIC: tl.constexpr,
              SERIAL: tl.constexpr, SPLIT: tl.constexpr):
    """A GEMV program's ``(BN,)`` fp32 sums for row ``m``: added to the fp32 output by atomics (``SPLIT_ATOMIC``),
    stored in the output's dtype (one K split), or, with ``SERIAL`` (session 7), stored to this split's row of the
    fp32 workspace ``ws (M, SPLIT, N)``; the program that raises column tile ``pid_n``'s counter to ``SPLIT`` (acquire
    / release at GPU scope, after a CTA barrier: every thread's partial sums are visible to it) adds the ``SPLIT``
    rows in a fixed order, stores them in the output's dtype and resets the counter to 0 for the next call. No zeroed
    output, no cast kernel, and the result does not depend on the order the splits finish in."""
    if SERIAL:
        tl.store(ws + (m * SPLIT + pid_k) * N + offs_n, total, mask=mask_n)
        tl.debug_barrier()
        c = cnt + m * tl.num_programs(0) + pid_n
        if tl.atomic_add(c, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
            acc = tl.load(ws + (m * SPLIT) * N + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg")
            for i in tl.static_range(1, SPLIT):
                acc += tl.load(ws + (m * SPLIT + i) * N + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + m * N + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)
            tl.atomic_xchg(c, 0, sem="relaxed", scope="gpu")
    elif SPLIT_ATOMIC:
        tl.atomic_add(out_ptr + m * N + offs_n, total, mask=mask_n, sem="relaxed")
    else:
        tl.store(out_ptr + m * N + offs_n, total.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _column_tile(q, scale, zero, pid_n, offs_n, N, KW, KS, KZ, BN: tl.constexpr, TILED: tl.constexpr):
    """Where column tile ``pid_n`` starts in each operand, the row stride and the column offsets within a row: the
    weight's own layout (``N`` a row, columns ``offs_n``) or, with ``TILED``, :func:`~lowbit.ops.repack.tile_columns`'
    (``BN`` a row, columns ``0..BN-1``; ``KW`` rows of ``q``, ``KS`` of ``scale``, ``KZ`` of ``zero`` a tile)."""
    if TILED:
        return (q + pid_n * KW * BN, scale + pid_n * KS * BN, zero + pid_n * KZ * BN, BN, tl.arange(0, BN))
    return q, scale, zero, N, offs_n


@triton.jit
def _gemv6_kernel(x_ptr, out_ptr, q4, scale, zero, perm, N, K, KW, KS, stride_xm, ws, cnt,
                  GROUP: tl.constexpr, HAS_PERM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  K_PER_PROG: tl.constexpr, SPLIT_ATOMIC: tl.constexpr, EVEN: tl.constexpr, XB: tl.constexpr,
                  PFD: tl.constexpr = 0, TILED: tl.constexpr = False, SERIAL: tl.constexpr = False,
                  SPLIT: tl.constexpr = 1, PF0: tl.constexpr = 0):
    """GEMV v6 (affine 4-bit, ``GROUP % BK == 0``): the codes decoded and multiplied two at a time in fp16x2
    (:func:`_word_dot_f16x2`), each word's sum taken to fp32 at once; scale and zero point per (word, column)
    in fp32 as in v4. x is scaled by a power of two chosen per program from its largest ``|x|`` (into
    [128, 256)), so a half's sum of four products (``|c| <= 15``) stays below 2^14 and small x stay normal;
    the product is scaled back once at the end. Rounding: fp16 products and three fp16 additions per half
    (relative ~2^-11 of a word's partial sum) instead of fp32. ``PFD > 0``: each iteration also asks L2 for the
    word tile ``PFD`` tiles ahead (``prefetch.global.L2``, one per 128-byte line; no registers, no shared
    memory), so more of the stream is in flight than the loads alone keep — within the program's own K range only:
    where a program has no more than ``PFD`` tiles (the default 8192×28672 grid: 8 tiles a program, ``PFD`` 8)
    every prefetch is predicated off and only the code around it changes (session 7) — which is worth 2-2.5 µs there:
    with it ptxas issues both 16-byte word loads and the scale/zero loads at the loop top, without it the second word
    load comes after half of the tile's arithmetic (offline SASS). ``PF0 > 0`` (power of two):
    the program's first ``PF0`` tiles are asked of L2 before the x prologue. ``TILED`` (session 7): the words, scales
    and zero points come in column tiles of ``BN`` (:func:`lowbit.ops.repack.tile_columns`: ``(N/BN, rows, BN)``,
    ``KW`` word rows and ``KS`` scale rows a tile), so a program's whole K range is one contiguous run."""
    pid_n, pid_k, m, offs_n, mask_n, xr = _gemv_program(x_ptr, N, stride_xm, BN)
    q4, scale, zero, RS, coff = _column_tile(q4, scale, zero, pid_n, offs_n, N, KW, KS, KS, BN, TILED)
    NW: tl.constexpr = BK // 8
    LINES: tl.constexpr = (BN + 31) // 32  # 128-byte lines of words in one row of the tile
    kstart = pid_k * K_PER_PROG
    k_end = tl.minimum(kstart + K_PER_PROG, K)
    if PF0 > 0:  # ask L2 for the first PF0 word tiles before the x prologue below (its latency overlaps theirs)
        pr0 = kstart // 8 + tl.arange(0, PF0 * NW)
        pc0 = tl.arange(0, LINES) * 32
        ok0 = ((pr0 * 8 < k_end)[:, None] & (pid_n * BN + pc0 < N)[None, :]).to(tl.int32)
        if not TILED:
            pc0 = pc0 + pid_n * BN
        _prefetch_l2(q4 + pr0[:, None] * RS + pc0[None, :], ok0)
    mx = tl.zeros((XB,), dtype=tl.float32)
    for k0 in range(0, K_PER_PROG, XB):  # this program's largest |x|
        kk = kstart + k0 + tl.arange(0, XB)
        mk = kk < k_end
        if HAS_PERM:
            src = tl.load(perm + kk, mask=mk, other=0)
        else:
            src = kk
        mx = tl.maximum(mx, tl.abs(tl.load(xr + src, mask=mk, other=0.0).to(tl.float32)))
    ex = (tl.max(mx, axis=0).to(tl.int32, bitcast=True) >> 23) & 255  # biased exponent of the largest |x|
    sb = tl.minimum(tl.maximum(261 - ex, 1), 253)  # 2^(7 - (ex - 127)): the largest |x| lands in [128, 256)
    xsc = (sb << 23).to(tl.float32, bitcast=True)
    xsc16 = xsc * 0.0625
    acc = tl.zeros((NW, BN), dtype=tl.float32)
    for kt in range(0, K_PER_PROG, BK):
        k0 = kstart + kt
        g = k0 // GROUP
        rows = k0 // 8 + tl.arange(0, NW)
        s, z = _group_scale_zero(scale, zero, g, RS, coff, mask_n & (k0 < K), EVEN)
        if EVEN:
            w = tl.load(q4 + rows[:, None] * RS + coff[None, :], eviction_policy="evict_first")
        else:
            w = tl.load(q4 + rows[:, None] * RS + coff[None, :], mask=(rows[:, None] < KW) & mask_n[None, :],
                        other=0, eviction_policy="evict_first")
        if PFD > 0:
            pr = rows + PFD * NW
            pc = tl.arange(0, LINES) * 32
            ok = ((pr * 8 < k_end)[:, None] & (pid_n * BN + pc < N)[None, :]).to(tl.int32)
            if not TILED:
                pc = pc + pid_n * BN
            _prefetch_l2(q4 + pr[:, None] * RS + pc[None, :], ok)
        x0 = _xrow(xr, perm, rows, 0, K, 8, EVEN, HAS_PERM)
        x1 = _xrow(xr, perm, rows, 1, K, 8, EVEN, HAS_PERM)
        x2 = _xrow(xr, perm, rows, 2, K, 8, EVEN, HAS_PERM)
        x3 = _xrow(xr, perm, rows, 3, K, 8, EVEN, HAS_PERM)
        x4 = _xrow(xr, perm, rows, 4, K, 8, EVEN, HAS_PERM)
        x5 = _xrow(xr, perm, rows, 5, K, 8, EVEN, HAS_PERM)
        x6 = _xrow(xr, perm, rows, 6, K, 8, EVEN, HAS_PERM)
        x7 = _xrow(xr, perm, rows, 7, K, 8, EVEN, HAS_PERM)
        X = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        p0 = _f16x2(x0 * xsc, x4 * xsc)
        p1 = _f16x2(x1 * xsc16, x5 * xsc16)
        p2 = _f16x2(x2 * xsc, x6 * xsc)
        p3 = _f16x2(x3 * xsc16, x7 * xsc16)
        A = _word_dot_f16x2(w, p0[:, None], p1[:, None], p2[:, None], p3[:, None])
        acc += s[None, :] * (A - z[None, :] * (X * xsc)[:, None])
    total = tl.sum(acc, axis=0) * (1.0 / xsc)
    _gemv_out(out_ptr, total, ws, cnt, m, pid_n, pid_k, offs_n, mask_n, N, SPLIT_ATOMIC, SERIAL, SPLIT)


@triton.jit
def _prmt(a, b, sel):
    """PTX ``prmt.b32``: byte ``i`` of the result is byte ``n_i`` of the eight bytes ``{b, a}`` (``a`` holds bytes
    0-3), ``n_i`` the ``i``-th nibble of ``sel``'s low 16 bits (its high 16 bits are ignored). A nibble with bit 3
    set would replicate the byte's sign instead: every selector here keeps bit 3 clear."""
    return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _pack16x2(lo, hi, BF16: tl.constexpr):
    """Two fp32 tensors -> int32 of two 16-bit floats (``lo`` in the low half), bf16 or fp16, each rounded to nearest
    even exactly as ``Tensor.to`` rounds."""
    if BF16:
        return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=tl.int32,
                                         is_pure=True, pack=1)
    return _f16x2(lo, hi)


@triton.jit
def _unpack16x2(p, BF16: tl.constexpr):
    """The two 16-bit floats of ``p`` (low half first) as exact fp32: bf16 by moving bits, fp16 by ``cvt``."""
    if BF16:
        return (p << 16).to(tl.float32, bitcast=True), (p & -65536).to(tl.float32, bitcast=True)
    return tl.inline_asm_elementwise(
        "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }", "=f,=f,r", [p],
        dtype=(tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _byte_planes(e0, e1, e2, e3, BF16: tl.constexpr):
    """Four fp32 table entries rounded to 16-bit floats -> (their four low bytes, their four high bytes), one int32
    each: the registers a ``prmt`` look-up reads."""
    p01 = _pack16x2(e0, e1, BF16)
    p23 = _pack16x2(e2, e3, BF16)
    return _prmt(p01, p23, 0x6420), _prmt(p01, p23, 0x7531)


@triton.jit
def _nibble_selectors(w):
    """``prmt`` selectors for the eight 4-bit codes of each word ``w``: ``s`` = the codes' low 3 bits nibble by
    nibble (codes 0-3 in its low 16 bits, ``sh`` = codes 4-7), ``u`` = byte ``i`` of the entries-0-7 look-up or
    ``4 + i`` (entries 8-15) by code bit 3 (``uh``: codes 4-7). The high halves are moved down by ``mul.hi``
    (``w·2^16 >> 32``), which ptxas may issue to the FMA pipe instead of the integer one; ``u`` is one LOP3 with
    0x32103210 in a register."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 k, t;
        mov.b32 k, 0x32103210;
        and.b32 $0, $4, 0x77777777;
        shr.u32 t, $4, 1;
        lop3.b32 $1, t, 0x44444444, k, 0xEA;
        mul.hi.u32 $2, $0, 0x10000;
        mul.hi.u32 $3, $1, 0x10000;
        }""", "=r,=r,=r,=r,r", [w], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _lut_dot4(acc, s, u, tl0, tl1, tl2, tl3, th0, th1, th2, th3, xa, xb, xc, xd, SIXTEEN: tl.constexpr,
              BF16: tl.constexpr):
    """``acc + Σ x·table[c]`` over four codes per element: the nibbles of ``s``'s low 16 bits are the codes' low 3 bits;
    with ``SIXTEEN`` (16 entries) ``u``'s nibbles pick, per code, the look-up of entries 0-7 (``i``) or 8-15
    (``4 + i``). Byte planes ``tl*`` / ``th*`` hold the table's low / high bytes, four entries a register.
    Per four codes: two ``prmt`` (eight entries) or six (sixteen), two to interleave the bytes into 16-bit pairs,
    the pairs to fp32, four FMA in fp32 (``xa..xd``: the codes' x, ``(NW, 1)``)."""
    if SIXTEEN:
        lo = _prmt(_prmt(tl0, tl1, s), _prmt(tl2, tl3, s), u)
        hi = _prmt(_prmt(th0, th1, s), _prmt(th2, th3, s), u)
    else:
        lo = _prmt(tl0, tl1, s)
        hi = _prmt(th0, th1, s)
    f0, f1 = _unpack16x2(_prmt(lo, hi, 0x5140), BF16)
    f2, f3 = _unpack16x2(_prmt(lo, hi, 0x7362), BF16)
    acc += f0 * xa
    acc += f1 * xb
    acc += f2 * xc
    acc += f3 * xd
    return acc


@triton.jit
def _xpair(xr, rows, j: tl.constexpr, K, PER: tl.constexpr, EVEN: tl.constexpr, BF16: tl.constexpr,
           PAIR: tl.constexpr):
    """x at positions ``2j`` and ``2j + 1`` of each word row ``rows`` (``PER`` codes a word) as fp32 ``(NW, 1)``:
    with ``PAIR`` (K even, x's row 4-byte aligned) both from one 32-bit load, else two 16-bit loads."""
    kk = rows * PER + 2 * j
    if PAIR:
        xi = xr.to(tl.pointer_type(tl.int32))
        if EVEN:
            p = tl.load(xi + kk // 2)
        else:
            p = tl.load(xi + kk // 2, mask=kk < K, other=0)
        a, b = _unpack16x2(p, BF16)
        return a[:, None], b[:, None]
    if EVEN:
        return tl.load(xr + kk).to(tl.float32)[:, None], tl.load(xr + kk + 1).to(tl.float32)[:, None]
    return (tl.load(xr + kk, mask=kk < K, other=0.0).to(tl.float32)[:, None],
            tl.load(xr + kk + 1, mask=kk + 1 < K, other=0.0).to(tl.float32)[:, None])


@triton.jit
def _word_tile(q_ptr, row0, roff, rows, KW, mask_n, N, EVEN: tl.constexpr):
    """The ``(NW, BN)`` words of one bit plane from word row ``row0`` (``roff``: the tile's offsets past its first
    row, ``rows`` its word rows); unless ``EVEN``, zero past the plane's ``KW`` rows and the weight's columns."""
    if EVEN:
        return tl.load(q_ptr + row0 * N + roff, eviction_policy="evict_first")
    return tl.load(q_ptr + row0 * N + roff, mask=(rows[:, None] < KW) & mask_n[None, :], other=0,
                   eviction_policy="evict_first")


@triton.jit
def _row_entry(cb, offs_n, mask_n, j: tl.constexpr, NC: tl.constexpr):
    """Entry ``j`` of each column's own table (``(N, NC)``) as fp32 ``(1, BN)``; 0 past the table (2-bit codes)."""
    if j < NC:
        return tl.load(cb + offs_n[None, :] * NC + j, mask=mask_n[None, :], other=0.0).to(tl.float32)
    return tl.zeros((1, offs_n.shape[0]), dtype=tl.float32)


@triton.jit
def _gemv7_kernel(x_ptr, out_ptr, q4, q2, q1, scale, cb, N, K, KW4, KW2, KW1, KS, stride_xm, ws, cnt,
                  BITS: tl.constexpr, GROUP: tl.constexpr, ROW: tl.constexpr, BF16: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr, K_PER_PROG: tl.constexpr, SPLIT_ATOMIC: tl.constexpr,
                  EVEN: tl.constexpr, PAIR: tl.constexpr, F16T: tl.constexpr = False, TILED: tl.constexpr = False,
                  SERIAL: tl.constexpr = False, SPLIT: tl.constexpr = 1):
    """GEMV v7, look-up tables (NF4/FP4 shared codebook with a scale per group, SqueezeLLM per-column tables;
    2-4 bit codes) read by byte permutes: the table's 16-bit entries are split into a low-byte and a high-byte
    plane, four entries a register, and one ``prmt.b32`` looks up four codes in eight entries (two ``prmt`` and
    a ``prmt`` select by code bit 3 for sixteen), see :func:`_lut_dot4`. The weights looked up are exactly the
    reference's: each entry is rounded once to x's dtype (bf16 or fp16) — for a shared codebook after the multiply
    by the group's scale in fp32, ``round(codebook[j]·scale)``, as ``dequantize_packed(...).to(x.dtype)`` — and the
    products with x are summed in fp32. Per-column tables are built once per program, shared ones once per
    (K-tile, column); a K-tile lies in one group (``GROUP % BK == 0``).

    4-bit codes: a word's nibbles are the selectors as stored. 2/3-bit codes (bit planes ``q2`` + ``q1``): the
    even and odd codes of a ``q2`` word are each moved into nibbles with one mask, and their high bits (``q1``) into
    nibble bit 2 by a byte permute and three shift-or-mask steps; x is read in the matching order.

    ``F16T`` (per-column tables, bf16 x): the bf16-rounded entries are stored as fp16 times a power of two per
    column (the largest into [2^14, 2^15)), which holds every bf16 entry of at least 2^-31 of the column's largest
    exactly (smaller ones land on fp16's subnormal step: an error below 2^-39 of the largest), so the looked-up
    pairs convert to fp32 by ``cvt`` (the FMA pipe) instead of two integer ops; the column's sum is scaled back
    once at the end.

    ``TILED`` (session 7): the bit planes (and a shared table's scales) in column tiles of ``BN``
    (:func:`lowbit.ops.repack.tile_columns`), so a program's K range is one contiguous run of each plane."""
    pid_n, pid_k, m, offs_n, mask_n, xr = _gemv_program(x_ptr, N, stride_xm, BN)
    q4, scale, q2, RS, coff = _column_tile(q4, scale, q2, pid_n, offs_n, N, KW4, KS, KW2, BN, TILED)
    if TILED:
        q1 = q1 + pid_n * KW1 * BN
    NC: tl.constexpr = 1 << BITS
    SIX: tl.constexpr = BITS == 4
    kstart = pid_k * K_PER_PROG
    TB: tl.constexpr = BF16 and not F16T  # the tables' own format: bf16, or fp16
    if ROW:  # this program's columns' tables, once
        e0 = _row_entry(cb, offs_n, mask_n, 0, NC)
        e1 = _row_entry(cb, offs_n, mask_n, 1, NC)
        e2 = _row_entry(cb, offs_n, mask_n, 2, NC)
        e3 = _row_entry(cb, offs_n, mask_n, 3, NC)
        e4 = _row_entry(cb, offs_n, mask_n, 4, NC)
        e5 = _row_entry(cb, offs_n, mask_n, 5, NC)
        e6 = _row_entry(cb, offs_n, mask_n, 6, NC)
        e7 = _row_entry(cb, offs_n, mask_n, 7, NC)
        e8 = _row_entry(cb, offs_n, mask_n, 8, NC)
        e9 = _row_entry(cb, offs_n, mask_n, 9, NC)
        e10 = _row_entry(cb, offs_n, mask_n, 10, NC)
        e11 = _row_entry(cb, offs_n, mask_n, 11, NC)
        e12 = _row_entry(cb, offs_n, mask_n, 12, NC)
        e13 = _row_entry(cb, offs_n, mask_n, 13, NC)
        e14 = _row_entry(cb, offs_n, mask_n, 14, NC)
        e15 = _row_entry(cb, offs_n, mask_n, 15, NC)
        if F16T:  # bf16-rounded entries, times 2^t per column (largest into [2^14, 2^15)), held as exact fp16
            e0 = e0.to(tl.bfloat16).to(tl.float32)
            e1 = e1.to(tl.bfloat16).to(tl.float32)
            e2 = e2.to(tl.bfloat16).to(tl.float32)
            e3 = e3.to(tl.bfloat16).to(tl.float32)
            e4 = e4.to(tl.bfloat16).to(tl.float32)
            e5 = e5.to(tl.bfloat16).to(tl.float32)
            e6 = e6.to(tl.bfloat16).to(tl.float32)
            e7 = e7.to(tl.bfloat16).to(tl.float32)
            e8 = e8.to(tl.bfloat16).to(tl.float32)
            e9 = e9.to(tl.bfloat16).to(tl.float32)
            e10 = e10.to(tl.bfloat16).to(tl.float32)
            e11 = e11.to(tl.bfloat16).to(tl.float32)
            e12 = e12.to(tl.bfloat16).to(tl.float32)
            e13 = e13.to(tl.bfloat16).to(tl.float32)
            e14 = e14.to(tl.bfloat16).to(tl.float32)
            e15 = e15.to(tl.bfloat16).to(tl.float32)
            mx = tl.maximum(tl.maximum(tl.maximum(tl.abs(e0), tl.abs(e1)), tl.maximum(tl.abs(e2), tl.abs(e3))),
                            tl.maximum(tl.maximum(tl.abs(e4), tl.abs(e5)), tl.maximum(tl.abs(e6), tl.abs(e7))))
            mx = tl.maximum(mx, tl.maximum(
                tl.maximum(tl.maximum(tl.abs(e8), tl.abs(e9)), tl.maximum(tl.abs(e10), tl.abs(e11))),
                tl.maximum(tl.maximum(tl.abs(e12), tl.abs(e13)), tl.maximum(tl.abs(e14), tl.abs(e15)))))
            ex = (mx.to(tl.int32, bitcast=True) >> 23) & 255  # biased exponent of the largest |entry|
            tb = tl.minimum(tl.maximum(268 - ex, 1), 253)  # 2^(14 - (ex - 127)); it and 1/it normal floats
            ts = (tb << 23).to(tl.float32, bitcast=True)
            e0, e1, e2, e3, e4, e5, e6, e7 = e0 * ts, e1 * ts, e2 * ts, e3 * ts, e4 * ts, e5 * ts, e6 * ts, e7 * ts
            e8, e9, e10, e11 = e8 * ts, e9 * ts, e10 * ts, e11 * ts
            e12, e13, e14, e15 = e12 * ts, e13 * ts, e14 * ts, e15 * ts
        tl0, th0 = _byte_planes(e0, e1, e2, e3, TB)
        tl1, th1 = _byte_planes(e4, e5, e6, e7, TB)
        tl2, th2 = tl0, th0
        tl3, th3 = tl1, th1
        if SIX:
            tl2, th2 = _byte_planes(e8, e9, e10, e11, TB)
            tl3, th3 = _byte_planes(e12, e13, e14, e15, TB)
    else:  # the shared codebook's entries (fp32 scalars; 0 past 2^BITS)
        c0 = tl.load(cb + 0)
        c1 = tl.load(cb + 1)
        c2 = tl.load(cb + 2)
        c3 = tl.load(cb + 3)
        c4 = tl.load(cb + 4) if NC > 4 else 0.0
        c5 = tl.load(cb + 5) if NC > 4 else 0.0
        c6 = tl.load(cb + 6) if NC > 4 else 0.0
        c7 = tl.load(cb + 7) if NC > 4 else 0.0
        c8 = tl.load(cb + 8) if SIX else 0.0
        c9 = tl.load(cb + 9) if SIX else 0.0
        c10 = tl.load(cb + 10) if SIX else 0.0
        c11 = tl.load(cb + 11) if SIX else 0.0
        c12 = tl.load(cb + 12) if SIX else 0.0
        c13 = tl.load(cb + 13) if SIX else 0.0
        c14 = tl.load(cb + 14) if SIX else 0.0
        c15 = tl.load(cb + 15) if SIX else 0.0
    NW: tl.constexpr = BK // 8 if SIX else BK // 16
    acc = tl.zeros((NW, BN), dtype=tl.float32)
    roff = tl.arange(0, NW)[:, None] * RS + coff[None, :]  # a word tile's offsets past its first row (hoisted)
    for kt in range(0, K_PER_PROG, BK):
        k0 = kstart + kt
        if not ROW:  # entries round(codebook[j] · scale[g, n]) of this K-tile's group
            g = k0 // GROUP  # (1, BN): the table is built in the word tile's own layout, no conversion
            if EVEN:
                sc = tl.load(scale + g * RS + coff[None, :]).to(tl.float32)
            else:
                sc = tl.load(scale + g * RS + coff[None, :], mask=mask_n[None, :] & (k0 < K), other=0.0).to(tl.float32)
            tl0, th0 = _byte_planes(c0 * sc, c1 * sc, c2 * sc, c3 * sc, TB)
            tl1, th1 = _byte_planes(c4 * sc, c5 * sc, c6 * sc, c7 * sc, TB)
            tl2, th2 = tl0, th0
            tl3, th3 = tl1, th1
            if SIX:
                tl2, th2 = _byte_planes(c8 * sc, c9 * sc, c10 * sc, c11 * sc, TB)
                tl3, th3 = _byte_planes(c12 * sc, c13 * sc, c14 * sc, c15 * sc, TB)
        if SIX:
            rows = k0 // 8 + tl.arange(0, NW)
            w = _word_tile(q4, k0 // 8, roff, rows, KW4, mask_n, RS, EVEN)
            s, u, sh, uh = _nibble_selectors(w)
            xa, xb = _xpair(xr, rows, 0, K, 8, EVEN, BF16, PAIR)
            xc, xd = _xpair(xr, rows, 1, K, 8, EVEN, BF16, PAIR)
            acc = _lut_dot4(acc, s, u, tl0, tl1, tl2, tl3, th0, th1, th2, th3, xa, xb, xc, xd, SIX, TB)
            xa, xb = _xpair(xr, rows, 2, K, 8, EVEN, BF16, PAIR)
            xc, xd = _xpair(xr, rows, 3, K, 8, EVEN, BF16, PAIR)
            acc = _lut_dot4(acc, sh, uh, tl0, tl1, tl2, tl3, th0, th1, th2, th3, xa, xb, xc, xd, SIX, TB)
        else:
            rows = k0 // 16 + tl.arange(0, NW)
            w = _word_tile(q2, k0 // 16, roff, rows, KW2, mask_n, RS, EVEN)
            se = w & 0x33333333  # even codes 0, 2, .., 14: nibble j holds code 2j's low two bits
            so = (w >> 2) & 0x33333333  # odd codes 1, 3, .., 15
            if BITS == 3:  # high bits: q1 word rows // 2, its half rows % 2 (bit i = code i of this q2 word)
                if EVEN:
                    h = tl.load(q1 + (rows // 2)[:, None] * RS + coff[None, :], eviction_policy="evict_first")
                else:
                    h = tl.load(q1 + (rows // 2)[:, None] * RS + coff[None, :],
                                mask=(rows[:, None] // 2 < KW1) & mask_n[None, :], other=0,
                                eviction_policy="evict_first")
                h = h >> ((rows % 2) * 16)[:, None]
                hx = _prmt(h, 0, 0x4140)  # codes 0-7 in byte 0, codes 8-15 in byte 2
                hy = (hx | (hx << 4)) & 0x0F0F0F0F  # codes 0-3 at bits 0-3, 4-7 at bits 8-11 (8-15 likewise)
                ht = hy | (hy << 2)  # bit 4j: code 2j; bit 4j + 1: code 2j + 1
                se = se | ((ht & 0x11111111) << 2)
                so = so | ((ht & 0x22222222) << 1)
            x0, x1 = _xpair(xr, rows, 0, K, 16, EVEN, BF16, PAIR)
            x2, x3 = _xpair(xr, rows, 1, K, 16, EVEN, BF16, PAIR)
            x4, x5 = _xpair(xr, rows, 2, K, 16, EVEN, BF16, PAIR)
            x6, x7 = _xpair(xr, rows, 3, K, 16, EVEN, BF16, PAIR)
            acc = _lut_dot4(acc, se, se, tl0, tl1, tl2, tl3, th0, th1, th2, th3, x0, x2, x4, x6, False, TB)
            acc = _lut_dot4(acc, so, so, tl0, tl1, tl2, tl3, th0, th1, th2, th3, x1, x3, x5, x7, False, TB)
            x0, x1 = _xpair(xr, rows, 4, K, 16, EVEN, BF16, PAIR)
            x2, x3 = _xpair(xr, rows, 5, K, 16, EVEN, BF16, PAIR)
            x4, x5 = _xpair(xr, rows, 6, K, 16, EVEN, BF16, PAIR)
            x6, x7 = _xpair(xr, rows, 7, K, 16, EVEN, BF16, PAIR)
            acc = _lut_dot4(acc, se >> 16, se, tl0, tl1, tl2, tl3, th0, th1, th2, th3, x0, x2, x4, x6, False, TB)
            acc = _lut_dot4(acc, so >> 16, so, tl0, tl1, tl2, tl3, th0, th1, th2, th3, x1, x3, x5, x7, False, TB)
    if ROW and F16T:
        acc = acc * (1.0 / ts)
    total = tl.sum(acc, axis=0)
    _gemv_out(out_ptr, total, ws, cnt, m, pid_n, pid_k, offs_n, mask_n, N, SPLIT_ATOMIC, SERIAL, SPLIT)


@triton.jit
def _tile_offsets(M, N, BM: tl.constexpr, BN: tl.constexpr):
    """Rows and columns of this program's ``(BM, BN)`` output tile (grid axes 0 and 1) and their bounds masks."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def _store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om, SPLIT_K: tl.constexpr):
    """Write an fp32 tile: cast and store, or accumulate atomically into an fp32 output under split-K."""
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mo = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mo)
    else:
        tl.atomic_add(ptrs, acc, mask=mo, sem="relaxed")


@triton.jit
def _mm_kernel(x_ptr, out_ptr, q4, q2, q1, scale, zero, cb, M, N, K, stride_xm, stride_om,
               BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
               K_PER_PROG: tl.constexpr, RS: tl.constexpr, MAGIC: tl.constexpr = False, SEL: tl.constexpr = True,
               FP16: tl.constexpr = False):
    offs_m, offs_n, mask_m, mask_n = _tile_offsets(M, N, BM, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    kstart = tl.program_id(2) * K_PER_PROG
    for kt in range(0, K_PER_PROG, BK):
        k0 = kstart + kt
        offs_k = k0 + tl.arange(0, BK)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        if MAGIC:  # affine, B in {2, 4}: bf16(128 + c) exactly from the bits; zero and scale after the dot
            if BITS == 4:
                c = _codes2d_rs(q4, k0, offs_n, mask_n, N, (K + 7) // 8, BK, 4)
            else:
                c = _codes2d_rs(q2, k0, offs_n, mask_n, N, (K + 15) // 16, BK, 2)
            if FP16:
                wb = (c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)  # 1024 + c
                OFF: tl.constexpr = 1024.0
            else:
                wb = (c | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)  # 128 + c
                OFF: tl.constexpr = 128.0
            d = tl.dot(a, wb)
            g = k0 // GROUP
            ms = mask_n & (k0 < K)
            s = tl.load(scale + g * N + offs_n, mask=ms, other=0.0).to(tl.float32)
            z = tl.load(zero + g * N + offs_n, mask=ms, other=0.0).to(tl.float32)
            rs = tl.sum(a.to(tl.float32), axis=1)
            acc += s[None, :] * (d - rs[:, None] * (OFF + z)[None, :])
        else:
            w = _dequant_tile(q4, q2, q1, scale, zero, cb, k0, offs_n, mask_n, N, K, BK, BITS, GROUP, MODE, RS, SEL)
            acc = tl.dot(a, w.to(a.dtype), acc)
    _store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om, SPLIT_K)


@triton.jit
def _m_first_offsets(M, BM: tl.constexpr, BN: tl.constexpr):
    """Row and column offsets of this program's tile, M fastest: the programs that share a weight tile (the
    same ``BN`` columns) run next to each other."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    return (pid % num_m) * BM + tl.arange(0, BM), (pid // num_m) * BN + tl.arange(0, BN)


@triton.jit
def _mmt_kernel(x_ptr, out_ptr, q4, q2, q1, scale, zero, cb, M, N, K, stride_xm, stride_om,
                BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RS: tl.constexpr, SEL: tl.constexpr):
    """Large-M fused dequantize-matmul computed transposed, ``outᵀ (N, M) = W (N, K) · xᵀ``: the dequantized
    weight tile is the dot's first operand, which a Hopper wgmma reads from registers, and ``xᵀ`` the second,
    loaded by the software pipeline into shared memory, so the dot can stay asynchronous while the next tile
    is dequantized. Programs that share a weight tile run next to each other (M fastest)."""
    offs_m, offs_n = _m_first_offsets(M, BM, BN)
    mask_n = offs_n < N
    rm = offs_m % M
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        xt = tl.load(x_ptr + rm[None, :] * stride_xm + offs_k[:, None], mask=offs_k[:, None] < K, other=0.0)
        w = _dequant_tile(q4, q2, q1, scale, zero, cb, k0, offs_n, mask_n, N, K, BK, BITS, GROUP, MODE, RS, SEL)
        acc = tl.dot(tl.trans(w.to(xt.dtype)), xt, acc)
    tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m < M)[None, :] & mask_n[:, None])


@triton.jit
def _mmt4_kernel(x_ptr, out_ptr, qp, scale, zero, M, N, K, KW, stride_xm, stride_om, E23,
                 B: tl.constexpr, GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 ONE_GROUP: tl.constexpr):
    """Large-M fused W4A16/W2A16 (affine codes with a zero point), transposed like :func:`_mmt_kernel`, decoding
    each weight in about three instructions.

    ``x`` comes with each ``BK``-block's columns in code-position order (:func:`permute_for_mmt4`): position
    ``i`` of the block's ``NW = BK/PER`` words is columns ``[i·NW, (i + 1)·NW)``, which is the order in which
    the decoded ``(PER, NW, BN)`` tile flattens, so the dot needs no interleaving of codes. Decode: a shift per
    word brings code ``i`` to bit ``q = 12 + B·(i mod SL)`` (``SL`` codes share one shift), one LOP3 masks it
    and ORs in the exponent of ``2^(23 - q)`` (the float is then exactly
    ``2^(23 - q) + c``), and one FMA gives ``w = f·s − (2^(23 - q) + z)·s``; the offset is rounded once per
    column and group, an error of at most ``s·2^(−1−q)`` (``q >= 12``)."""
    PER: tl.constexpr = 32 // B
    NW: tl.constexpr = BK // PER
    SL: tl.constexpr = (11 - B) // B + 1
    offs_m, offs_n = _m_first_offsets(M, BM, BN)
    rn = offs_n % N
    rm = offs_m % M
    r = tl.arange(0, NW)
    i3 = tl.arange(0, PER)[:, None, None]
    q3 = 12 + B * (i3 % SL)  # the bit each code position is brought to
    d3 = q3 - B * i3
    mask3 = ((1 << B) - 1) << q3
    exp3 = E23 - (q3 << 23)  # float bits of 2^(23 - q)
    base3 = (1 << (23 - q3)).to(tl.float32)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for k0 in range(0, K, BK):
        w = tl.load(qp + (k0 // PER + r)[:, None] * N + rn[None, :])[None, :, :]
        if ONE_GROUP:
            s = tl.load(scale + (k0 // GROUP) * N + rn).to(tl.float32)[None, None, :]
            z = tl.load(zero + (k0 // GROUP) * N + rn).to(tl.float32)[None, None, :]
        else:
            g = (k0 + PER * r) // GROUP
            s = tl.load(scale + g[:, None] * N + rn[None, :]).to(tl.float32)[None, :, :]
            z = tl.load(zero + g[:, None] * N + rn[None, :]).to(tl.float32)[None, :, :]
        v = tl.where(d3 >= 0, w << tl.maximum(d3, 0), w >> tl.maximum(-d3, 0))
        f = ((v & mask3) | exp3).to(tl.float32, bitcast=True)
        a = f * s - (base3 + z) * s  # (PER, NW, BN): row i·NW + r of the block is code i of word r
        a = tl.reshape(a.to(x_ptr.dtype.element_ty), (BK, BN))
        xt = tl.load(x_ptr + rm[None, :] * stride_xm + (k0 + tl.arange(0, BK))[:, None])
        acc = tl.dot(tl.trans(a), xt, acc)
    tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m < M)[None, :] & (offs_n < N)[:, None])


@triton.jit
def _mm4_kernel(x_ptr, out_ptr, qp, scale, zero, M, N, K, KW, stride_xm, stride_om, E23,
                B: tl.constexpr, GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                SPLIT_K: tl.constexpr, K_PER_PROG: tl.constexpr):
    """mm v4 (affine, one bit plane, ``GROUP % BK == 0``): the K-tile is taken code position by code position.

    A ``(BK/PER, BN)`` tile of words holds, for each code position ``i``, the weights of rows
    ``k0 + PER·r + i``; each is decoded exactly in place (as in :func:`_ex_dot`: one LOP3 and one subtract),
    scaled with one FMA (``c·s − z·s``), and multiplied by the matching strided columns of x with its own
    ``tl.dot`` (K-depth ``BK/PER`` >= 16). No shifts per code, no reshape of the tile.
    """
    PER: tl.constexpr = 32 // B
    NW: tl.constexpr = BK // PER
    LOW: tl.constexpr = 23 // B
    offs_m, offs_n, mask_m, mask_n = _tile_offsets(M, N, BM, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    kstart = tl.program_id(2) * K_PER_PROG
    for kt in range(0, K_PER_PROG, BK):
        k0 = kstart + kt
        rows = k0 // PER + tl.arange(0, NW)
        w = tl.load(qp + rows[:, None] * N + offs_n[None, :], mask=(rows[:, None] < KW) & mask_n[None, :], other=0,
                    eviction_policy="evict_first")
        hi = w >> 9
        g = k0 // GROUP
        ms = mask_n & (k0 < K)
        s = tl.load(scale + g * N + offs_n, mask=ms, other=0.0).to(tl.float32)
        zs = -tl.load(zero + g * N + offs_n, mask=ms, other=0.0).to(tl.float32) * s
        for i in tl.static_range(PER):
            if i < LOW:
                v = w
            else:
                v = hi
            c = _exact_code(v, E23, B * i - 9 * (i >= LOW), B)
            wt = (c * s[None, :] + zs[None, :]).to(x_ptr.dtype.element_ty)
            kk = rows * PER + i
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & (kk[None, :] < K),
                        other=0.0)
            acc = tl.dot(a, wt, acc)
    _store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om, SPLIT_K)


@triton.jit
def _dequant_kernel(out_ptr, q4, q2, q1, scale, zero, cb, perm, N, K, n_off, n_end, stride_out,
                    BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, RS: tl.constexpr, SEL: tl.constexpr, HAS_PERM: tl.constexpr,
                    TRANS: tl.constexpr = False):
    """Columns ``[n_off, n_end)`` of W^T into ``out[:, n - n_off]`` (``TRANS``: rows of W into
    ``out[n - n_off, :]``)."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = n_off + pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < n_end
    k0 = pid_k * BK
    w = _dequant_tile(q4, q2, q1, scale, zero, cb, k0, offs_n, mask_n, N, K, BK, BITS, GROUP, MODE, RS, SEL)
    offs_k = k0 + tl.arange(0, BK)
    mk = offs_k < K
    if HAS_PERM:  # act-order: kernel row k is row perm[k] of W^T, so x needs no permutation
        rows = tl.load(perm + offs_k, mask=mk, other=0)
    else:
        rows = offs_k
    if TRANS:
        tl.store(out_ptr + (offs_n - n_off)[:, None] * stride_out + rows[None, :],
                 tl.trans(w.to(out_ptr.dtype.element_ty)), mask=mask_n[:, None] & mk[None, :])
    else:
        tl.store(out_ptr + rows[:, None] * stride_out + (offs_n - n_off)[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=mk[:, None] & mask_n[None, :])


@triton.jit
def _dequant4_kernel(out_ptr, qp, scale, zero, perm, N, K, KW, n_off, n_end, stride_out, E23,
                     B: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     HAS_PERM: tl.constexpr):
    """Dequantize v4 (affine, one bit plane, ``GROUP % BK == 0``): each code position of a word tile is decoded
    exactly in place (as :func:`_ex_dot`) and its ``BN``-wide rows stored straight to rows ``k0 + PER·r + i``."""
    PER: tl.constexpr = 32 // B
    NW: tl.constexpr = BK // PER
    LOW: tl.constexpr = 23 // B
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = n_off + pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < n_end
    k0 = pid_k * BK
    rows = k0 // PER + tl.arange(0, NW)
    w = tl.load(qp + rows[:, None] * N + offs_n[None, :], mask=(rows[:, None] < KW) & mask_n[None, :], other=0)
    hi = w >> 9
    g = k0 // GROUP
    s = tl.load(scale + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    zs = -tl.load(zero + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32) * s
    for i in tl.static_range(PER):
        if i < LOW:
            v = w
        else:
            v = hi
        c = _exact_code(v, E23, B * i - 9 * (i >= LOW), B)
        kk = rows * PER + i
        mk = kk < K
        if HAS_PERM:  # act-order: kernel row k is row perm[k] of W^T
            dst = tl.load(perm + kk, mask=mk, other=0)
        else:
            dst = kk
        tl.store(out_ptr + dst[:, None] * stride_out + (offs_n - n_off)[None, :],
                 (c * s[None, :] + zs[None, :]).to(out_ptr.dtype.element_ty), mask=mk[:, None] & mask_n[None, :])


# -- launch helpers --------------------------------------------------------------------------------

_SM_COUNT: dict[int, int] = {}


def _sms(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _bk_for(group: int, want: int) -> int:
    bk = want
    while group % bk:
        bk //= 2
    return max(bk, 32)


def split_k(tiles: int, K: int, BK: int, programs: int, split: int | None = None, cap: int | None = None) \
        -> tuple[int, int]:
    """``(split, k_per)``: K cut into ``split`` ranges of ``k_per`` (a multiple of ``BK``) for a grid of ``tiles``
    output tiles. ``split=None``: doubled from 1 while the grid has fewer than ``programs`` programs, each range
    keeps at least one K-tile, and ``split`` stays below ``cap``; then trimmed to the ranges K needs."""
    k_tiles = -(-K // BK)
    if split is None:
        split = 1
        while tiles * split < programs and split * 2 <= k_tiles and (cap is None or split < cap):
            split *= 2
    k_per = -(-k_tiles // split) * BK
    return -(-K // k_per), k_per


@functools.lru_cache(maxsize=1024)
def gemv_config(N: int, K: int, group: int, sms: int, bits: int, mode: str,
                BN: int | None = None, BK: int | None = None, split: int | None = None,
                num_warps: int | None = None, v: int | None = None, waves: int = 4, pf: bool = GEMV_PREFETCH,
                num_stages: int | None = None, pmin: int | None = None, stages: int = 1,
                tma: bool = False, pfd: int = 0, act_order: bool = False, f16t: bool | None = None,
                tiled: bool = False, serial: bool = False, pf0: int = 0) -> dict:
    """Tile sizes for the GEMV path: enough programs to cover the SMs ``waves`` times (split-K when N is small).

    ``v=6`` is :func:`_gemv6_kernel` (affine 4-bit: codes decoded and multiplied in fp16x2; others fall back
    to v4), ``v=4`` is :func:`_gemv3_kernel` with the exact exponent decode, ``v=5`` the same on x
    prepared once per call by :func:`_xprep_kernel` (affine 2/4-bit), ``v=3`` the mantissa decode, ``v=2`` the
    earlier kernel (kept for the benchmark). The look-up-table modes
    (v3 and v4 alike) read one scale per 32 codes, so their K-tile need not lie in one group.
    ``stages > 1`` pipelines the K loop through shared memory (``STAGES`` of :func:`_gemv3_kernel`); ``tma``
    (affine 2/4-bit, v4, N·4 a multiple of 16) loads the word tiles with a tensor descriptor. ``split=1``
    writes x's dtype straight from the kernel: one launch, no zeroed fp32 buffer, no cast.
    ``v=7`` is :func:`_gemv7_kernel` (look-up tables by byte permutes; the default for the table modes, BN 32,
    one warp, a grid of >= 80 programs per SM, see ``LUT7_TILES``; ``f16t`` picks scaled-fp16 per-column tables for
    bf16 x, ``LUT7_F16T``); :func:`gemv` takes v4 instead where x is fp32.
    ``tiled`` (v6 and v7; session 7): the kernel reads copies of the planes, scales and zero points in column tiles
    of ``BN`` (:func:`lowbit.ops.repack.tiled_columns`, built on the first call and cached on each tensor: as much
    memory again as the weight), so each program's K range is one contiguous run; other versions ignore it.
    ``serial`` (v6 and v7, split > 1; session 7): no zeroed fp32 output and no cast: each split stores its sums to a
    workspace and the last one to finish a column tile adds them (:func:`_gemv_out`) and writes x's dtype.
    ``pf0`` (v6): L2 prefetch of each program's first ``pf0`` word tiles before its x prologue.
    Default ``v`` (``None``) for affine 4-bit weights with ``N >= 8192``: 6 with BN 64 and split 8, and at
    ``N >= 16384`` with 128-wide groups the L2 prefetch 8 tiles ahead (``pfd``). H100, session 5, under CUDA
    graphs (NOTES_gpu.md): act-order v6 60.9/60.7 vs v4 64.8/64.3 µs (runs 2, 3), with prefetch 57.6/57.5 (runs
    3, 4); HQQ g64 v6 55.4/55.3 vs 69.7/69.8 (prefetch slower there: 66.7/66.4); 4096×11008 v6 16.6/16.4 vs
    17.6/17.3; plain and symmetric int4 at 8192×28672 v6 alone 53.8/53.9 vs 52.8/52.9 but with prefetch
    51.3/51.3 (asym) and 51.4/51.2 (sym) vs 52.9/53.2 and 53.4/53.3 (runs 3, 4). 4 for the other affine weights.
    """
    if v is None and GEMV_TILED and (mode != "affine" or act_order):  # (read on the first call of a shape: cached)
        tiled = True
    if v is None:
        v = 4
        if mode != "affine":  # byte-permute tables (session 6); gemv() takes v4 where x is not bf16/fp16
            v = 7
        elif bits == 4 and N >= 8192:
            v = 6
            BN, split = BN or 64, split or 8
            if N >= 16384 and group % 128 == 0 and not pfd:
                pfd = 8
    if BN is None and v == 7 and mode != "affine":
        BN = LUT7_TILES["BN"]
    if BN is None and v == 6 and mode == "affine" and bits == 4:
        BN = 128 if N >= 16384 else 32
    if BN is None:
        if v >= 4 and mode == "affine":  # H100 sweeps (NOTES_gpu.md): 8192×28672 BN64 split 4 64.5 µs
            BN = (256 if bits == 3 else 64) if N >= 16384 else 32  # (int3 BN256 split 8); 4096×11008 BN32 split 4
            if waves == 4 and bits != 3:
                waves = 16 if bits == 2 and N >= 16384 else 8  # int2 8192×28672 split 8 (46.6-46.8 vs 48.8-49.2 µs
                # under graphs: session 4 run 9, session 5 run 2)
        else:  # v3 sweep: affine BN64 split-K 4 88 µs; tables BN128 BK128
            BN = (64 if mode == "affine" else 128) if v >= 3 else (128 if mode == "affine" else 64)
    warps = num_warps or 4
    if v == 7 and mode != "affine":  # byte-permute tables (:func:`_gemv7_kernel`); a shared table's tile in one group
        warps = num_warps or LUT7_TILES["num_warps"]
        BK = BK or LUT7_TILES["BK"]
        if mode == "lut":
            BK = _bk_for(group, BK)
        if waves == 4:
            waves = LUT7_TILES["waves"]
    elif v >= 3 and mode != "affine":
        BK = max(32, (BK or 128) // 32 * 32)
        if mode == "lut_row" and bits == 4 and (BK // 32) * BN == 4 * 32 * warps:
            # H100, Triton 3.6: when the (BK/32, BN) tile is exactly one 4-column vector per thread, the 4th column
            # of every vector came out wrong (columns 3 mod 4, every K segment; err 8e-2 at BN64·BK256 and
            # BN128·BK128 with 4 warps; right with 8 warps, other tiles, and in the Triton interpreter)
            warps *= 2
    else:
        BK = _bk_for(group, BK or (128 if bits != 3 or mode == "affine" else 64))
    split, k_per = split_k(-(-N // BN), K, BK, waves * sms, split)
    cfg = dict(BN=BN, BK=BK, split=split, k_per=k_per, num_warps=warps, v=v, pf=pf)
    if num_stages is not None:
        cfg["num_stages"] = num_stages
    if pmin is not None:
        cfg["pmin"] = pmin
    if stages > 1:
        cfg["stages"] = stages
    if tma:
        cfg["tma"] = True
    if pfd:
        cfg["pfd"] = pfd
    if f16t is not None:
        cfg["f16t"] = f16t
    if tiled:
        cfg["tiled"] = True
    if serial:
        cfg["serial"] = True
    if pf0:
        cfg["pf0"] = pf0
    return cfg


def gemv7_fits(pw: PackedWeight, BK: int, dtype: torch.dtype) -> bool:
    """Whether :func:`_gemv7_kernel` (byte-permute tables) takes this weight and input: a look-up-table mode, x in
    bf16 or fp16 (the dtype the entries are rounded to), and a shared table's K-tile inside one group."""
    return (pw.mode != "affine" and dtype in (torch.float16, torch.bfloat16) and BK % 32 == 0
            and (pw.mode == "lut_row" or pw.group_size % BK == 0))


def gemv6_fits(pw: PackedWeight, BK: int) -> bool:
    """Whether :func:`_gemv6_kernel` (fp16x2 decode) takes this weight: affine 4-bit, K-tile inside one group."""
    return pw.mode == "affine" and pw.bits == 4 and pw.group_size % BK == 0 and pw.zero_point is not None


def _tma_words(pw: PackedWeight, cfg: dict, v: int):
    """The tensor descriptor of the weight's single word plane for :func:`_gemv3_kernel`'s ``TMA`` path, or None
    where that path does not apply (look-up tables, 3-bit, v < 4, a row of words not 16-byte aligned)."""
    if not (cfg.get("tma") and v == 4 and pw.mode == "affine" and pw.bits in (2, 4)):
        return None
    qp = pw.q4 if pw.bits == 4 else pw.q2
    if (qp.shape[1] * 4) % 16 or qp.data_ptr() % 16:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(qp, [cfg["BK"] * pw.bits // 32, cfg["BN"]])


_SERIAL_WS: dict = {}


def _serial_workspace(device: torch.device, M: int, split: int, N: int, n_tiles: int):
    """The ``serial`` split-K GEMV's fp32 partial sums ``(M, split, N)`` and its int32 counters ``(M, n_tiles)``, one
    pair per (device, stream, shape), made once (counters zeroed once; each call's last program resets its own), so
    GEMVs on one stream reuse them in order and GEMVs on different streams never share them."""
    key = (device, torch.cuda.current_stream(device).cuda_stream, M, split, N, n_tiles)
    hit = _SERIAL_WS.get(key)
    if hit is None:
        hit = (torch.empty((M, split, N), device=device, dtype=torch.float32),
               torch.zeros((M, n_tiles), device=device, dtype=torch.int32))
        _SERIAL_WS[key] = hit
    return hit


def _tiled(t: torch.Tensor | None, BN: int, dummy: torch.Tensor) -> torch.Tensor:
    """``t`` in column tiles of ``BN`` (:func:`~lowbit.ops.repack.tiled_columns`, cached on ``t``); ``dummy`` for an
    absent or empty operand."""
    return dummy if t is None or not t.numel() else tiled_columns(t, BN)


def _args(pw: PackedWeight, dummy: torch.Tensor):
    z = lambda t: dummy if t is None else t  # noqa: E731
    return (pw.q4 if pw.q4.numel() else dummy, pw.q2 if pw.q2.numel() else dummy,
            pw.q1 if pw.q1.numel() else dummy, z(pw.scale), z(pw.zero_point), z(pw.codebook))


def gemv(x2: torch.Tensor, pw: PackedWeight, cfg: dict | None = None) -> torch.Tensor:
    """``x2: (M, K)`` contiguous, M small -> ``(M, N)`` (fp32 when split-K accumulates atomically; x's dtype with one
    split or ``serial``)."""
    M, K = x2.shape
    N = pw.out_features
    cfg = cfg or gemv_config(N, K, pw.group_size, _sms(x2.device), pw.bits, pw.mode, act_order=pw.perm is not None)
    if cfg.get("v") == 7 and not gemv7_fits(pw, cfg["BK"], x2.dtype):  # (fp32 x, affine codes): v4 and its tiles
        cfg = gemv_config(N, K, pw.group_size, _sms(x2.device), pw.bits, pw.mode, v=4)
    atomic = cfg["split"] > 1
    v = cfg.get("v", 4)
    if v == 6 and not gemv6_fits(pw, cfg["BK"]):
        v = 4
    serial = atomic and bool(cfg.get("serial")) and v in (6, 7)  # the last split adds the others' sums
    prep = v == 5 and pw.mode == "affine" and pw.bits in (2, 4)  # the x preparation zeroes the output too
    out = (torch.empty if prep else torch.zeros)((M, N), device=x2.device, dtype=torch.float32) if atomic and \
        not serial else torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    q4, q2, q1, sc, zp, cb = _args(pw, out)
    grid = (triton.cdiv(N, cfg["BN"]), cfg["split"], M)
    args = (x2, out, q4, q2, q1, sc, zp, cb, pw.perm if pw.perm is not None else out,
            N, K, pw.q4.shape[0], pw.q2.shape[0], pw.q1.shape[0], x2.stride(0))
    meta = dict(BITS=pw.bits, GROUP=pw.group_size, MODE=MODE_ID[pw.mode], HAS_PERM=pw.perm is not None,
                BN=cfg["BN"], BK=cfg["BK"], K_PER_PROG=cfg["k_per"], SPLIT_ATOMIC=atomic, num_warps=cfg["num_warps"])
    if "num_stages" in cfg:
        meta["num_stages"] = cfg["num_stages"]
    if v >= 3:
        meta["STAGES"] = cfg.get("stages", 1)
    desc = _tma_words(pw, cfg, v)
    if desc is not None:
        meta["TMA"] = True
        q4, q2 = (desc, q2) if pw.bits == 4 else (q4, desc)
        args = (args[0], args[1], q4, q2) + args[4:]
    tiled = bool(cfg.get("tiled")) and v in (6, 7)  # column-tiled copies of the planes and scales (cached on them)
    if tiled:
        q4, q2, q1, sc, zp = (_tiled(t, cfg["BN"], out) for t in (pw.q4, pw.q2, pw.q1, pw.scale, pw.zero_point))
    ks = pw.scale.shape[0] if pw.scale is not None else 0
    ws, cnt = _serial_workspace(x2.device, M, cfg["split"], N, grid[0]) if serial else (out, out)
    if serial:
        atomic = False
    if v == 7:
        _gemv7_kernel[grid](x2, out, q4, q2, q1, sc, cb, N, K, pw.q4.shape[0], pw.q2.shape[0], pw.q1.shape[0],
                            ks, x2.stride(0), ws, cnt, TILED=tiled, SERIAL=serial, SPLIT=cfg["split"], BITS=pw.bits, GROUP=pw.group_size, ROW=pw.mode == "lut_row",
                            BF16=x2.dtype == torch.bfloat16, BN=cfg["BN"], BK=cfg["BK"], K_PER_PROG=cfg["k_per"],
                            SPLIT_ATOMIC=atomic, EVEN=N % cfg["BN"] == 0 and K % cfg["k_per"] == 0,
                            PAIR=K % 2 == 0 and x2.stride(0) % 2 == 0 and x2.data_ptr() % 4 == 0,
                            F16T=bool(cfg.get("f16t", LUT7_F16T)) and pw.mode == "lut_row" and x2.dtype == torch.bfloat16,
                            num_warps=cfg["num_warps"])
    elif v == 6:
        _gemv6_kernel[grid](x2, out, q4, sc, zp, pw.perm if pw.perm is not None else out, N, K, pw.q4.shape[0],
                            ks, x2.stride(0), ws, cnt, TILED=tiled, SERIAL=serial, SPLIT=cfg["split"],
                            GROUP=pw.group_size, HAS_PERM=pw.perm is not None, BN=cfg["BN"],
                            BK=cfg["BK"], K_PER_PROG=cfg["k_per"], SPLIT_ATOMIC=atomic,
                            EVEN=N % cfg["BN"] == 0 and K % cfg["k_per"] == 0,
                            XB=min(1024, triton.next_power_of_2(cfg["k_per"])), PFD=cfg.get("pfd", 0),
                            PF0=cfg.get("pf0", 0),
                            num_warps=cfg["num_warps"])
    elif v == 2:
        _gemv_kernel[grid](*args, **meta)
    elif v == 5 and pw.mode == "affine" and pw.bits in (2, 4):  # v4 decode on x prepared once per call
        B = pw.bits
        KW = (pw.q4 if B == 4 else pw.q2).shape[0]
        pmin = cfg.get("pmin", GEMV_PMIN)
        xf = torch.empty((M, K), device=x2.device, dtype=torch.float32)
        xs = torch.empty((M, KW), device=x2.device, dtype=torch.float32)
        xb = torch.empty((M, KW), device=x2.device, dtype=torch.float32)
        BW = 128
        nprog = triton.cdiv(KW, BW)
        _xprep_kernel[(nprog, M)](x2, pw.perm if pw.perm is not None else xs, xf, xs, xb, out, K, KW, N,
                                  x2.stride(0), B=B, PMIN=pmin, HAS_PERM=pw.perm is not None, BW=BW,
                                  BZ=triton.next_power_of_2(triton.cdiv(N, nprog)), ZERO=atomic, num_warps=4)
        even = N % cfg["BN"] == 0 and K % cfg["k_per"] == 0
        args = (xf, out, q4, q2, q1, sc, zp, cb, out, N, K, pw.q4.shape[0], pw.q2.shape[0], pw.q1.shape[0], K)
        meta["HAS_PERM"] = False
        _gemv3_kernel[grid](*args, 0x4B000000, **meta, PF=False, DEC=1, EVEN=even, PMIN=pmin, xs_ptr=xs, xb_ptr=xb,
                            XPRE=True)
    else:  # v3: mantissa decode; v4: exact exponent decode, unmasked when the tiles divide the weight
        even = v >= 4 and N % cfg["BN"] == 0 and K % cfg["k_per"] == 0
        _gemv3_kernel[grid](*args, 0x4B000000, **meta,
                            PF=bool(cfg.get("pf")) and pw.mode == "affine" and pw.bits != 3 and desc is None,
                            DEC=1 if v >= 4 else 0, EVEN=even, PMIN=cfg.get("pmin", GEMV_PMIN))
    return out


def mm_config(M: int, N: int, K: int, group: int, sms: int, v: int = 3, BM: int | None = None,
              BN: int | None = None, BK: int | None = None, split: int | None = None, num_warps: int | None = None,
              num_stages: int | None = None, waves: int = 4) -> dict:
    """Tiles for the ``tl.dot`` path; ``v=4`` is :func:`_mm4_kernel` (K-tile 128 for 4-bit codes)."""
    if M <= 64:  # H100 sweep at M = 16, 8192×28672: BN128 BK64 split-K 4 best (129 µs)
        bm, bn, bk, warps, stages = 16, 128, 64, 4, 4
    elif M <= 256:
        bm, bn, bk, warps, stages = 64, 128, 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    if v == 4:
        bk = 128
    BM, BN, warps, stages = BM or bm, BN or bn, num_warps or warps, num_stages or stages
    BK = BK or (bk if v == 4 else _bk_for(group, bk))
    split, k_per = split_k(-(-M // BM) * -(-N // BN), K, BK, waves * sms, split, cap=16)
    return dict(BM=BM, BN=BN, BK=BK, split=split, k_per=k_per, num_warps=warps, num_stages=stages, v=v)


def mm4_fits(pw: PackedWeight, BK: int) -> bool:
    """Whether :func:`_mm4_kernel` takes this weight at K-tile ``BK``."""
    return (pw.mode == "affine" and pw.bits in (2, 4) and pw.group_size % BK == 0 and BK * pw.bits // 32 >= 16
            and pw.zero_point is not None)


def mm(x2: torch.Tensor, pw: PackedWeight, cfg: dict | None = None) -> torch.Tensor:
    """Tiled fused dequant-matmul: ``x2: (M, K)`` (already permuted) -> ``(M, N)`` in x's dtype."""
    M, K = x2.shape
    N = pw.out_features
    if cfg is None:  # H100, 8192×28672: M=16 v4 BN256 split 8 110.8 µs vs v3 129.5; M=64 373 vs 423; M>=256 v3
        v4 = M <= MM4_MAX_M and mm4_fits(pw, 128)
        cfg = mm_config(M, N, K, pw.group_size, _sms(x2.device), **(dict(v=4, BN=256, num_stages=3) if v4 else {}))
    if pw.bits == 3 and cfg["num_stages"] > 2:  # the two-plane re-read tiles need more shared memory per stage
        cfg = dict(cfg, num_stages=2)
    if cfg["split"] > 1:
        out = torch.zeros((M, N), device=x2.device, dtype=torch.float32)
    else:
        out = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    q4, q2, q1, sc, zp, cb = _args(pw, out)
    if cfg.get("v", 3) == 4:
        if not mm4_fits(pw, cfg["BK"]):
            raise ValueError(f"mm v4 needs affine 2/4-bit codes and group_size % BK == 0 with BK·bits/32 >= 16; "
                             f"got mode={pw.mode}, bits={pw.bits}, group_size={pw.group_size}, BK={cfg['BK']}")
        grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(N, cfg["BN"]), cfg["split"])
        _mm4_kernel[grid](x2, out, q4 if pw.bits == 4 else q2, sc, zp, M, N, K,
                          (pw.q4 if pw.bits == 4 else pw.q2).shape[0], x2.stride(0), out.stride(0), 0x4B000000,
                          B=pw.bits, GROUP=pw.group_size, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"],
                          SPLIT_K=cfg["split"], K_PER_PROG=cfg["k_per"], num_warps=cfg["num_warps"],
                          num_stages=cfg["num_stages"])
        return out.to(x2.dtype)
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(N, cfg["BN"]), cfg["split"])
    magic = cfg.get("MAGIC", MM_MAGIC) and pw.mode == "affine" and pw.bits in (2, 4) and \
        x2.dtype in (torch.float16, torch.bfloat16)
    _mm_kernel[grid](x2, out, q4, q2, q1, sc, zp, cb, M, N, K, x2.stride(0), out.stride(0),
                     BITS=pw.bits, GROUP=pw.group_size, MODE=MODE_ID[pw.mode],
                     BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], SPLIT_K=cfg["split"], K_PER_PROG=cfg["k_per"],
                     RS=cfg.get("RS", True) and (pw.bits != 3 or cfg.get("RS3", RS3)), MAGIC=magic, SEL=cfg.get("SEL", True), FP16=x2.dtype == torch.float16,
                     num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out.to(x2.dtype)


def mmt4_fits(pw: PackedWeight, BK: int) -> bool:
    """Whether :func:`_mmt4_kernel` takes this weight at K-tile ``BK`` (affine 2/4-bit codes with a zero point,
    one dot of K-depth ``BK·bits/32 >= 16`` per code position, K a multiple of ``BK``)."""
    return (pw.mode == "affine" and pw.bits in (2, 4) and BK * pw.bits // 32 >= 16 and pw.zero_point is not None
            and pw.in_features % BK == 0 and (pw.group_size % BK == 0 or BK % pw.group_size == 0))


def permute_for_mmt4(x2: torch.Tensor, bits: int, BK: int) -> torch.Tensor:
    """``x2 (M, K)`` with each ``BK``-block's columns in code-position order: column ``k0 + PER·r + i`` moves to
    ``k0 + NW·i + r`` (``PER = 32/bits`` codes per word, ``NW = BK/PER`` words per block)."""
    M, K = x2.shape
    PER = 32 // bits
    return x2.reshape(M, K // BK, BK // PER, PER).transpose(2, 3).reshape(M, K)


def mmt(x2: torch.Tensor, pw: PackedWeight, cfg: dict | None = None) -> torch.Tensor:
    """Large-M fused dequantize-matmul computed as ``(W · xᵀ)ᵀ`` (:func:`_mmt4_kernel` for affine 2/4-bit codes
    when ``cfg["v"] == 4``; :func:`_mmt_kernel` with a dequantized tile otherwise). ``x2 (M, K)`` is in the
    weight's own column order (act-order's permutation and the code-position order are one gather here);
    returns ``(M, N)`` in x's dtype."""
    M, K = x2.shape
    N = pw.out_features
    cfg = dict(MMT_TILES, **(cfg or {}))
    out = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    if pw.bits == 2 and cfg.get("v", 4) == 4:
        BK = max(BK, 256)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    extra = {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}
    stages = cfg["num_stages"] if BK <= 128 else min(2, cfg["num_stages"])  # 3 stages of BK 256 exceed 227 KB
    if cfg.get("v", 4) == 4 and mmt4_fits(pw, BK):
        if pw.perm is None:
            xp = permute_for_mmt4(x2, pw.bits, BK)
        else:  # column k0 + NW·i + r of the kernel's x is column perm[k0 + PER·r + i] of x
            PER = 32 // pw.bits
            xp = x2.index_select(1, pw.perm.long().reshape(K // BK, BK // PER, PER).transpose(1, 2).reshape(K))
        qp = pw.q4 if pw.bits == 4 else pw.q2
        _mmt4_kernel[grid](xp, out, qp, pw.scale, pw.zero_point, M, N, K, qp.shape[0], K, out.stride(0),
                           0x4B000000, B=pw.bits, GROUP=pw.group_size, BM=BM, BN=BN, BK=BK,
                           ONE_GROUP=pw.group_size % BK == 0, num_warps=cfg["num_warps"], num_stages=stages,
                           **extra)
        return out
    xp = x2 if pw.perm is None else x2.index_select(1, pw.perm.long())
    BK = _bk_for(pw.group_size, min(BK, 64))
    q4, q2, q1, sc, zp, cb = _args(pw, out)
    _mmt_kernel[grid](xp, out, q4, q2, q1, sc, zp, cb, M, N, K, xp.stride(0), out.stride(0), BITS=pw.bits,
                      GROUP=pw.group_size, MODE=MODE_ID[pw.mode], BM=BM, BN=BN, BK=BK, RS=True,
                      SEL=DEQUANT_SEL, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra)
    return out


def dequantize_t(pw: PackedWeight, dtype: torch.dtype, n_off: int = 0, n_end: int | None = None,
                 out: torch.Tensor | None = None, RS: bool = True, unpermute: bool = False,
                 SEL: bool | None = None, trans: bool = False) -> torch.Tensor:
    """Columns ``[n_off, n_end)`` of ``W^T`` as ``(K, n_end - n_off)`` in ``dtype``: rows in kernel order, or in
    the weight's own column order with ``unpermute`` (act-order rows scattered back through ``perm``).
    ``trans``: rows ``[n_off, n_end)`` of ``W`` instead, ``(n_end - n_off, K)``."""
    K, N = pw.in_features, pw.out_features
    n_end = N if n_end is None else n_end
    dev = pw.q4.device if pw.q4.numel() else pw.q2.device
    shape = (n_end - n_off, K) if trans else (K, n_end - n_off)
    out = torch.empty(shape, device=dev, dtype=dtype) if out is None else out
    q4, q2, q1, sc, zp, cb = _args(pw, out)
    if DEQUANT_V4 and not trans and pw.mode == "affine" and pw.bits in (2, 4) and pw.group_size % 128 == 0 and \
            pw.zero_point is not None:
        _dequant4_kernel[(triton.cdiv(K, 128), triton.cdiv(n_end - n_off, 128))](
            out, q4 if pw.bits == 4 else q2, sc, zp, pw.perm if unpermute and pw.perm is not None else out, N, K,
            (pw.q4 if pw.bits == 4 else pw.q2).shape[0], n_off, n_end, out.stride(0), 0x4B000000, B=pw.bits,
            GROUP=pw.group_size, BN=128, BK=128, HAS_PERM=unpermute and pw.perm is not None, num_warps=4)
        return out
    BK = _bk_for(pw.group_size, 64)
    BN = 128
    _dequant_kernel[(triton.cdiv(K, BK), triton.cdiv(n_end - n_off, BN))](
        out, q4, q2, q1, sc, zp, cb, pw.perm if unpermute and pw.perm is not None else out, N, K, n_off, n_end,
        out.stride(0), BITS=pw.bits, GROUP=pw.group_size, MODE=MODE_ID[pw.mode], BN=BN, BK=BK,
        RS=RS and (pw.bits != 3 or RS3),
        SEL=DEQUANT_SEL if SEL is None else SEL,
        HAS_PERM=unpermute and pw.perm is not None, TRANS=trans, num_warps=4)
    return out


_SIDE: dict[int, torch.cuda.Stream] = {}


def dequant_matmul(x2: torch.Tensor, pw: PackedWeight, chunk: int = 0, trans: bool | None = None,
                   overlap: bool | None = None) -> torch.Tensor:
    """Large M: dequantize to bf16 and let cuBLAS multiply. With ``chunk``, ``chunk`` columns at a time into
    one reused buffer, so the dequantized tile is still in L2 when cuBLAS reads it. ``x2`` is in the weight's
    own column order (act-order rows are scattered back by the dequantize kernel). ``trans``: the buffer holds
    rows of W (``x · Wᵀ``, the layout ``F.linear`` gives cuBLAS) instead of columns of Wᵀ. ``overlap``: two
    buffers, the next chunk dequantized on a high-priority side stream while cuBLAS multiplies this one."""
    K, N = pw.in_features, pw.out_features
    trans = DEQUANT_TRANS if trans is None else trans
    overlap = DEQUANT_OVERLAP if overlap is None else overlap

    def mm(b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.mm(x2, b.t() if trans else b, out=out)

    if chunk <= 0 or chunk >= N:
        return mm(dequantize_t(pw, x2.dtype, unpermute=True, trans=trans))
    y = torch.empty((x2.shape[0], N), device=x2.device, dtype=x2.dtype)
    shape = (chunk, K) if trans else (K, chunk)
    bufs = [torch.empty(shape, device=x2.device, dtype=x2.dtype) for _ in range(2 if overlap else 1)]

    def deq(i: int, n0: int, n1: int) -> None:
        b = bufs[i % len(bufs)]
        dequantize_t(pw, x2.dtype, n0, n1, b[: n1 - n0] if trans else b[:, : n1 - n0], unpermute=True, trans=trans)

    starts = list(range(0, N, chunk))
    if not overlap:
        for i, n0 in enumerate(starts):
            n1 = min(N, n0 + chunk)
            deq(i, n0, n1)
            b = bufs[0]
            mm(b[: n1 - n0] if trans else b[:, : n1 - n0], out=y[:, n0:n1])
        return y
    main = torch.cuda.current_stream(x2.device)
    side = _SIDE.get(x2.device.index or 0)
    if side is None:
        side = _SIDE[x2.device.index or 0] = torch.cuda.Stream(x2.device, priority=-1)
    side.wait_stream(main)
    ready: list = [None] * len(starts)
    freed: list = [None, None]  # freed[j]: cuBLAS has read buffer j

    def queue_deq(i: int) -> None:
        with torch.cuda.stream(side):
            if freed[i % 2] is not None:
                side.wait_event(freed[i % 2])
            deq(i, starts[i], min(N, starts[i] + chunk))
            ready[i] = side.record_event()

    queue_deq(0)
    for i, n0 in enumerate(starts):
        if i + 1 < len(starts):  # chunk i + 1 into the other buffer, once cuBLAS is done with chunk i - 1
            queue_deq(i + 1)
        n1 = min(N, n0 + chunk)
        main.wait_event(ready[i])
        b = bufs[i % 2]
        mm(b[: n1 - n0] if trans else b[:, : n1 - n0], out=y[:, n0:n1])
        freed[i % 2] = main.record_event()
    main.wait_stream(side)
    return y


# Session 7: 5 <= M <= 64 rows on affine 2/4-bit weights with a zero point go to the Gluon mma.sync kernel of
# :mod:`.wq_mm16` (H100, 8192×28672, M = 16: 71.6 µs = 2.27× bf16 under CUDA graphs, mm v4 102 µs; M = 8, 32, 64
# faster than mm v4 too: results/gpu_mm.md). False: mm v4 there (the benchmarks compare both).
MM16 = True


@functools.lru_cache(maxsize=1)
def _mm16():  # type: ignore[no-untyped-def]
    """:mod:`.wq_mm16`, or None where this Triton has no Gluon (it imports this module: imported on first use)."""
    try:
        from lowbit.ops.triton import wq_mm16
    except ImportError as e:
        log.info("the Gluon small-M kernel is not available (%s); mm v4 takes M = 5..64", e)
        return None
    return wq_mm16


def packed_linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
                  path: str | None = None) -> torch.Tensor:
    """``x (..., K) -> (..., N)``; ``path`` forces ``gemv``, ``mm``, ``mm16`` or ``dequant`` (default: by M and
    format: ``mm16`` where :func:`lowbit.ops.triton.wq_mm16.fits` and :data:`MM16`).

    Raises:
        ValueError: ``x``'s last dimension is not the weight's ``in_features`` (the kernels take K from ``x`` and
            would read past the packed weight), or an unknown ``path``.
    """
    if x.dim() == 0 or x.shape[-1] != pw.in_features:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} features, the weight {pw.in_features} "
                         f"(x shape {tuple(x.shape)})")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    M = x2.shape[0]
    if path is None:
        path = "gemv" if M <= GEMV_MAX_M else "mm" if M < BIG_M else "dequant"
        if path == "mm" and MM16 and _mm16() is not None and _mm16().fits(pw, M, x2.dtype):
            path = "mm16"
    if path == "gemv":
        y = gemv(x2, pw).to(x.dtype)
    else:
        if path == "mm":
            y = mm(x2 if pw.perm is None else x2.index_select(1, pw.perm.long()), pw)
        elif path == "mm16":  # takes x in the weight's own column order (applies act-order itself)
            mod = _mm16()
            if mod is None:
                raise ValueError("path='mm16' needs Triton's Gluon (Triton >= 3.5); this Triton has none")
            y = mod.mm16(x2, pw)
        elif path == "mmt":
            y = mmt(x2, pw)
        elif path.startswith("dequant"):  # "dequant" or "dequant:<chunk>"
            y = dequant_matmul(x2, pw, int(path.split(":")[1]) if ":" in path else DEQUANT_CHUNK)
        else:
            raise ValueError(f"path={path!r}; valid: gemv, mm, mm16, mmt, dequant, dequant:<chunk>")
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, pw.out_features)
