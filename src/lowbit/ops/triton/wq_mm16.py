"""Small-M W4A16 / W2A16 on tensor cores without the shared-memory round trip (Gluon, ``mma.sync`` m16n8k16).

For ``5 <= M <= 64`` activation rows (issue 7: M = 16 on 8192×28672). The tiled ``tl.dot`` kernels of
:mod:`lowbit.ops.triton.wq` dequantize a tile in a layout of Triton's choosing and convert it to the MMA's operand
layout through shared memory; here the layouts are explicit (Gluon), so each thread loads exactly the words whose
codes its own A fragments hold and decodes them in place — every ``convert_layout`` to the MMA operand layouts
is checked trivial (no data movement) when the kernel compiles.

Computed transposed, ``outᵀ (N, M) = W (N, K) · xᵀ``: one-warp programs own ``BR`` output columns (the MMA's rows)
and a split-K slice; the activations (padded to ``BM`` = 16, 32 or 64 rows) are the B operand. The K order
inside a tile follows the decode, and the activations are gathered into it once per call by a small Triton
kernel (:func:`_prep_kernel`, which also takes act-order's ``perm``, zero-pads, sums each K-tile of x and zeroes
the split-K output); the index arithmetic is in :mod:`.wq_mm16_layout`.

Decode: one shift and one LOP3 per code pair give ``bf16(128 + c)`` (fp16: ``1024 + c``) in both halves of a
register, exactly; the tile's MMA result ``T = Σ_k x_k (base + c_k)`` goes into a fresh accumulator, and the
zero point and scale are applied once per (K-tile, column, row) in fp32:
``acc += s · (T − (base + z) · Σ_k x_k)``. So the weights never take a bf16 rounding (the reference's bf16
weight does); HQQ's float zero points are exact too. Requires ``group_size % BK == 0``.

Latency, not issue or DRAM, bounds it (ncu, H100: 77 % of a warp's cycles wait on global loads, 30 % occupancy at 80
registers), so at M <= 16 each iteration first asks for the next tile's words, scales and activations (``pf`` and
``pfx``, on by default there). H100, 8192×28672, M = 16, under CUDA graphs: 71.6 µs = 2.27× bf16 (mm v4: 102 µs);
2-bit 55.5 µs = 2.93×.

Measured choices and outcomes: ``benchmarks/NOTES_gpu_mm.md``; numbers: ``results/gpu_mm.md``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.runtime.jit import constexpr_function

from lowbit.ops.repack import PackedWeight
from lowbit.ops.triton.wq import _sms, split_k
from lowbit.ops.triton.wq_mm16_layout import pairs_per_word

__all__ = ["MIN_M", "MAX_M", "fits", "mm16_config", "mm16", "packed_linear"]

MIN_M = 5  # below: the GEMVs of wq (M <= 4)
MAX_M = 64
MM16_TILES = dict(BR=32, BK=None, split=None, waves=None)  # defaults; None: chosen by mm16_config
# K-tile by padded M: the activation tile (BM × BK bf16) lives in registers (BM 64 × BK 128 spills). H100 runs 1-3 at
# M = 64: BK 32 250 / 395 / 342 µs under graphs (erratic), BK 64 196.7 (run 3 only; with pf + ws 214.6 / 212.3)
BK_BY_BM = {16: 128, 32: 64, 64: 64}
MM16_PF = None  # prefetch the next word tile (and its scales) before decoding this one; None: by BM (PF_BY_BM)
# H100 runs 2 / 3 (8192×28672, µs under graphs): M = 16 93.6 -> 79.2 / 94.5 -> 79.0 (int2 66.6 -> 60.3 / 66.5 -> 60.3);
# at M = 32 slower (117.6 -> 174.6): the prefetched tile's registers cut occupancy where the x tile is already large.
# Two tiles ahead (pf2) 81.1 (run 3). The activation tile and its sums too (pfx): 71.6 / 71.6 (runs 3 / 4; sym 71.6,
# act-order 72.6, HQQ 77.1, int2 55.5 in run 4), so on by default with pf
PF_BY_BM = {16: True, 32: False, 64: False}
PFX_BY_BM = {16: True, 32: False, 64: False}
MM16_WS = False  # serial split-K (workspace + reduce kernel) instead of atomics into a zeroed output
# (an L2 prefetch of the word tile 4 / 8 tiles ahead, runs 2-3, gained nothing and was removed: NOTES_gpu_mm.md)


def _log2(n: int) -> int:
    return n.bit_length() - 1


@functools.lru_cache(maxsize=64)
def _layouts(bits: int, BR: int, BK: int, BM: int):
    """Register layouts (one warp): the decoded tile ``(4S, BR, PPW, 2)`` (word row ``4s + t``, column ``c``, code
    pair ``p``, half ``e``), the activation tile ``(BM, S, 4, 2·PPW)`` and the MMA accumulator."""
    P = pairs_per_word(bits)
    I, S = BR // 8, BK // (8 * P)
    dec = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 0, 1]] + [[0, 0, 1 << b, 0] for b in range(_log2(P))]
        + [[0, 1 << b, 0, 0] for b in range(_log2(I))] + [[4 << b, 0, 0, 0] for b in range(_log2(S))],
        lane_bases=[[1, 0, 0, 0], [2, 0, 0, 0]] + [[0, I << b, 0, 0] for b in range(3)],
        warp_bases=[], block_bases=[], shape=[4 * S, BR, P, 2])
    xl = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 0, 1 << b] for b in range(_log2(2 * P))] + [[0, 1 << b, 0, 0] for b in range(_log2(S))]
        + [[8 << b, 0, 0, 0] for b in range(_log2(BM // 8))],
        lane_bases=[[0, 0, 1, 0], [0, 0, 2, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]],
        warp_bases=[], block_bases=[], shape=[BM, S, 4, 2 * P])
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    return dec, xl, mma


@constexpr_function
def _pair_magic_asm(B, BF16):
    """PTX for :func:`_pair_magic`: shift, then one LOP3 that masks the pair's bits and ORs in the magic exponent."""
    mask = "0x000F000F" if B == 4 else "0x00030003"
    magic = "0x43004300" if BF16 else "0x64006400"
    return "{ .reg .b32 t, k; mov.b32 k, " + magic + "; shr.u32 t, $1, $3; lop3.b32 $0, t, " + mask + ", k, 0xEA; }"


@gluon.jit
def _pair_magic(w, sh, B: gl.constexpr, BF16: gl.constexpr):
    """Codes ``p`` and ``p + 16/B`` of each word (``sh = B·p``) as ``base + c`` in the two halves of one bf16x2
    (base 128: 0x4300) or fp16x2 (base 1024: 0x6400) register: one shift and one LOP3, exact. ``pack=2``: the two
    elements (halves) of a pair come out as one register."""
    ASM: gl.constexpr = _pair_magic_asm(B, BF16)
    if BF16:
        r = gl.inline_asm_elementwise(ASM, "=r,r,r,r,r", [w, sh], dtype=gl.bfloat16, is_pure=True, pack=2)
    else:
        r = gl.inline_asm_elementwise(ASM, "=r,r,r,r,r", [w, sh], dtype=gl.float16, is_pure=True, pack=2)
    return r


@gluon.jit
def _mm16_kernel(xp_ptr, xs_ptr, out_ptr, qp, scale, zero, M, N, K, KW, stride_xm, stride_om,
                 B: gl.constexpr, GROUP: gl.constexpr, BR: gl.constexpr, BK: gl.constexpr, BM: gl.constexpr,
                 K_PER_PROG: gl.constexpr, SPLIT: gl.constexpr, EVEN: gl.constexpr,
                 DEC: gl.constexpr, XL: gl.constexpr, MMA: gl.constexpr, PF: gl.constexpr = False,
                 WS: gl.constexpr = False, PFX: gl.constexpr = False,
                 PF2: gl.constexpr = False):
    P: gl.constexpr = 16 // B
    I: gl.constexpr = BR // 8
    S: gl.constexpr = BK // (8 * P)
    DT: gl.constexpr = xp_ptr.dtype.element_ty
    BASE: gl.constexpr = 128.0 if DT == gl.bfloat16 else 1024.0
    L3: gl.constexpr = gl.SliceLayout(3, DEC)
    LW: gl.constexpr = gl.SliceLayout(2, L3)
    LA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    LB: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    LR: gl.constexpr = gl.SliceLayout(1, MMA)
    LM: gl.constexpr = gl.SliceLayout(0, MMA)
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n0 = pid_n * BR
    # word tile (4S, BR): word row 4s + t, column c (thread 4g + t holds columns I·g .. I·g + I - 1)
    q = gl.arange(0, 4 * S, layout=gl.SliceLayout(1, LW))
    cols = n0 + gl.arange(0, BR, layout=gl.SliceLayout(0, LW))
    pp = gl.arange(0, P, layout=gl.SliceLayout(0, gl.SliceLayout(0, L3)))
    sh = gl.expand_dims(gl.expand_dims(gl.expand_dims(pp * B, 0), 0), 3)  # (1, 1, P, 1)
    # activation tile (BM, S, 4, 2P): memory position KC·s + 2P·t + v of the gathered x
    X3: gl.constexpr = gl.SliceLayout(3, XL)
    X2: gl.constexpr = gl.SliceLayout(2, X3)
    xm = gl.arange(0, BM, layout=gl.SliceLayout(1, X2))
    xs_ = gl.arange(0, S, layout=gl.SliceLayout(0, X2))
    xt = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, X3)))
    xv = gl.arange(0, 2 * P, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, XL))))
    xoff = gl.expand_dims(gl.expand_dims(gl.expand_dims(xm * stride_xm, 1) + gl.expand_dims(xs_ * (8 * P), 0), 2)
                          + gl.expand_dims(gl.expand_dims(xt * (2 * P), 0), 0), 3) \
        + gl.expand_dims(gl.expand_dims(gl.expand_dims(xv, 0), 0), 0)
    # per-row (output column) and per-column (activation row) vectors in the accumulator's layout
    rho = gl.arange(0, BR, layout=LR)
    rcol = n0 + I * (rho % 8) + rho // 8
    mrow = gl.arange(0, BM, layout=LM)
    acc = gl.zeros((BR, BM), gl.float32, MMA)
    kstart = pid_k * K_PER_PROG
    k_last = kstart + K_PER_PROG - BK
    if PF:  # the first tile's loads before the loop; each iteration then asks for the next one first
        w, sv, zv = _tile_loads(qp, scale, zero, kstart, q, cols, rcol, N, K, KW, P, GROUP, EVEN, True)
        if PF2:  # and the one after it: two tiles in flight
            w2, sv2, zv2 = _tile_loads(qp, scale, zero, gl.minimum(kstart + BK, k_last), q, cols, rcol, N, K, KW, P,
                                       GROUP, EVEN, True)
        if PFX:
            x = gl.load(xp_ptr + xoff + kstart)
            xsum = gl.load(xs_ptr + (kstart // BK) * BM + mrow)
    for kt in range(0, K_PER_PROG, BK):
        k0 = kstart + kt
        if PF:  # the last iterations re-read the last tile (in bounds, unused) instead of masking
            k_n = gl.minimum(k0 + (2 * BK if PF2 else BK), k_last)
            w_n, sv_n, zv_n = _tile_loads(qp, scale, zero, k_n, q, cols, rcol, N, K, KW, P, GROUP, EVEN, True)
            if PFX:  # the activations' tile and its sums too (one tile ahead)
                k_x = gl.minimum(k0 + BK, k_last)
                x_n = gl.load(xp_ptr + xoff + k_x)
                xsum_n = gl.load(xs_ptr + (k_x // BK) * BM + mrow)
        else:
            w, sv, zv = _tile_loads(qp, scale, zero, k0, q, cols, rcol, N, K, KW, P, GROUP, EVEN, True)
        if not PFX:
            x = gl.load(xp_ptr + xoff + k0)
            xsum = gl.load(xs_ptr + (k0 // BK) * BM + mrow)
        w4, shb = gl.broadcast(gl.expand_dims(gl.expand_dims(w, 2), 3), sh)
        w4, _ = gl.broadcast(w4, gl.full((4 * S, BR, P, 2), 0, gl.int32, DEC))
        shb, _ = gl.broadcast(shb, w4)
        d = _pair_magic(w4, shb, B, DT == gl.bfloat16)
        d = gl.permute(gl.reshape(d, (S, 4, 8, I, P // 2, 2, 2)), (3, 2, 0, 4, 5, 1, 6))
        a = gl.convert_layout(gl.reshape(d, (BR, BK)), LA, assert_trivial=True)
        xb = gl.permute(gl.reshape(x, (BM, S, 4, P // 2, 2, 2)), (1, 3, 4, 2, 5, 0))
        b = gl.convert_layout(gl.reshape(xb, (BK, BM)), LB, assert_trivial=True)
        t = mma_v2(a, b, gl.zeros((BR, BM), gl.float32, MMA))
        acc += gl.expand_dims(sv.to(gl.float32), 1) * \
            (t - gl.expand_dims(zv.to(gl.float32) + BASE, 1) * gl.expand_dims(xsum, 0))
        if PF2:
            w, sv, zv = w2, sv2, zv2
            w2, sv2, zv2 = w_n, sv_n, zv_n
        elif PF:
            w, sv, zv = w_n, sv_n, zv_n
        if PF:
            if PFX:
                x, xsum = x_n, xsum_n
    om = gl.expand_dims(mrow < M, 0) & gl.expand_dims(rcol < N, 1)
    if SPLIT == 1 or WS:  # WS: this split's partial sums into its own slice of the workspace, no atomics
        optr = out_ptr + pid_k * (M * stride_om) + gl.expand_dims(mrow, 0) * stride_om + gl.expand_dims(rcol, 1)
        gl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=om)
    else:
        optr = out_ptr + gl.expand_dims(mrow, 0) * stride_om + gl.expand_dims(rcol, 1)
        gl.atomic_add(optr, acc, mask=om, sem="relaxed")


@gluon.jit
def _tile_loads(qp, scale, zero, k0, q, cols, rcol, N, K, KW, P: gl.constexpr, GROUP: gl.constexpr,
                EVEN: gl.constexpr, live):
    """The word tile ``(4S, BR)`` at K offset ``k0`` and its columns' scale and zero point (``live`` false:
    everything masked off)."""
    rows = k0 // (2 * P) + q
    wp = qp + gl.expand_dims(rows, 1) * N + gl.expand_dims(cols, 0)
    g = k0 // GROUP
    if EVEN:
        w = gl.load(wp)
        sv = gl.load(scale + g * N + rcol)
        zv = gl.load(zero + g * N + rcol)
    else:
        w = gl.load(wp, mask=(gl.expand_dims(rows, 1) < KW) & gl.expand_dims(cols < N, 0) & live, other=0)
        ok = (rcol < N) & (k0 < K) & live
        sv = gl.load(scale + g * N + rcol, mask=ok, other=0.0)
        zv = gl.load(zero + g * N + rcol, mask=ok, other=0.0)
    return w, sv, zv


@triton.jit
def _reduce_kernel(ws_ptr, out_ptr, n_out, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """``out = Σ_s ws[s]`` over the splits' partial sums, in a fixed order, cast to out's dtype."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n_out
    acc = tl.load(ws_ptr + o, mask=m, other=0.0)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(ws_ptr + s * n_out + o, mask=m, other=0.0)
    tl.store(out_ptr + o, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _prep_kernel(x_ptr, perm, xp_ptr, xs_ptr, out_ptr, M, K, stride_xm, n_out,
                 P: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, NKT: tl.constexpr,
                 HAS_PERM: tl.constexpr, ZB: tl.constexpr):
    """Programs ``(m, K-tile)`` for ``m < BM``: gather x into the kernel's K order (:mod:`.wq_mm16_layout`),
    zero-padded, and the tile's fp32 sum; the remaining programs zero ``ZB`` floats of the split-K output each."""
    pid = tl.program_id(0)
    if pid < BM * NKT:
        m = pid // NKT
        kt = pid % NKT
        j = kt * BK + tl.arange(0, BK)
        v = j % (2 * P)
        src = j - v + 2 * (v // 4) + (v // 2) % 2 + P * (v % 2)
        ok = (src < K) & (m < M)
        if HAS_PERM:
            src = tl.load(perm + src, mask=ok, other=0)
        xv = tl.load(x_ptr + m * stride_xm + src, mask=ok, other=0.0)
        tl.store(xp_ptr + m * (NKT * BK) + j, xv)
        tl.store(xs_ptr + kt * BM + m, tl.sum(xv.to(tl.float32), axis=0))
    else:
        o = (pid - BM * NKT) * ZB + tl.arange(0, ZB)
        tl.store(out_ptr + o, tl.zeros((ZB,), tl.float32), mask=o < n_out)


def fits(pw: PackedWeight, M: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether :func:`mm16` takes this weight at ``M`` rows of ``dtype`` activations: affine 2- or 4-bit codes
    with a zero point (symmetric, asymmetric, act-order, HQQ's float zeros) and ``group_size`` a multiple of the
    K-tile (``min(BK, group_size)``, itself a multiple of 32 / 64 codes), ``MIN_M <= M <= MAX_M``, bf16/fp16 x."""
    if pw.mode != "affine" or pw.bits not in (2, 4) or pw.zero_point is None or pw.scale is None:
        return False
    if not (MIN_M <= M <= MAX_M) or dtype not in (torch.bfloat16, torch.float16):
        return False
    return _bk(pw.group_size, pw.bits, 128) is not None


def _bk(group: int, bits: int, want: int) -> int | None:
    """The largest K-tile ``<= max(want, KC)`` that divides the group and holds whole four-word chunks (``KC``
    weights: 32 for 4-bit codes, 64 for 2-bit)."""
    kc = 8 * pairs_per_word(bits)
    bk = max(want, kc)
    while bk >= kc:
        if group % bk == 0 and bk % kc == 0:
            return bk
        bk //= 2
    return None


def mm16_config(M: int, N: int, K: int, group: int, bits: int, sms: int, BR: int | None = None,
                BK: int | None = None, split: int | None = None, waves: int | None = None) -> dict:
    """Tiles: ``BR`` output columns a one-warp program, ``BK`` weights of K a step (``<= group``), ``BM`` the
    activation rows padded to 16/32/64, and split-K until the grid has ``waves`` programs per SM."""
    BR = BR or MM16_TILES["BR"]
    BM = 16 if M <= 16 else 32 if M <= 32 else 64
    BK = _bk(group, bits, BK or MM16_TILES["BK"] or BK_BY_BM[BM])
    if BK is None:
        raise ValueError(f"no K-tile divides group_size={group} for {bits}-bit codes")
    waves = waves or MM16_TILES["waves"] or 32
    split, k_per = split_k(-(-N // BR), K, BK, waves * sms, split, cap=32)
    return dict(BR=BR, BK=BK, BM=BM, split=split, k_per=k_per)


def mm16(x2: torch.Tensor, pw: PackedWeight, cfg: dict | None = None) -> torch.Tensor:
    """``x2 (M, K)`` in the weight's own column order (act-order is applied here) -> ``(M, N)`` in x's dtype."""
    if x2.dim() != 2 or x2.shape[1] != pw.in_features or x2.stride(1) != 1:
        raise ValueError(f"mm16 takes x2 (M, in_features={pw.in_features}) with unit column stride, got shape "
                         f"{tuple(x2.shape)}, strides {tuple(x2.stride())}")
    M, K = x2.shape
    N = pw.out_features
    if not fits(pw, M, x2.dtype):
        raise ValueError(f"mm16 takes affine 2/4-bit weights with a zero point, group_size a multiple of the K-tile, "
                         f"{MIN_M} <= M <= {MAX_M} and bf16/fp16 x; got mode={pw.mode}, bits={pw.bits}, "
                         f"group_size={pw.group_size}, M={M}, dtype={x2.dtype}")
    cfg = dict(cfg or {})
    pf, ws, pfx = cfg.pop("pf", MM16_PF), cfg.pop("ws", MM16_WS), cfg.pop("pfx", None)
    pf2 = cfg.pop("pf2", False)
    c = mm16_config(M, N, K, pw.group_size, pw.bits, _sms(x2.device), **cfg)
    BR, BK, BM, split, k_per = c["BR"], c["BK"], c["BM"], c["split"], c["k_per"]
    ws = ws and split > 1
    pf = PF_BY_BM[BM] if pf is None else pf
    pfx = PFX_BY_BM[BM] if pfx is None else pfx
    P = pairs_per_word(pw.bits)
    nkt = split * k_per // BK
    Kt = nkt * BK
    qp = pw.q4 if pw.bits == 4 else pw.q2
    KW = qp.shape[0]
    dev = x2.device
    xp = torch.empty((BM, Kt), device=dev, dtype=x2.dtype)
    xs = torch.empty((nkt, BM), device=dev, dtype=torch.float32)
    if ws:  # serial split-K: each split writes its own slice, one reduce kernel sums them and casts
        part = torch.empty((split, M, N), device=dev, dtype=torch.float32)
    else:  # atomics into a zeroed fp32 output (split > 1), or x's dtype directly
        part = torch.empty((M, N), device=dev, dtype=torch.float32 if split > 1 else x2.dtype)
    ZB = 4096
    nz = -(-(M * N) // ZB) if split > 1 and not ws else 0
    _prep_kernel[(BM * nkt + nz,)](x2, pw.perm if pw.perm is not None else x2, xp, xs, part, M, K, x2.stride(0),
                                   M * N, P=P, BK=BK, BM=BM, NKT=nkt, HAS_PERM=pw.perm is not None, ZB=ZB,
                                   num_warps=4)
    dec, xl, mma = _layouts(pw.bits, BR, BK, BM)
    even = N % BR == 0 and Kt == KW * (2 * P)
    _mm16_kernel[(-(-N // BR), split)](xp, xs, part, qp, pw.scale, pw.zero_point, M, N, K, KW, Kt, N,
                                       B=pw.bits, GROUP=pw.group_size, BR=BR, BK=BK, BM=BM, K_PER_PROG=k_per,
                                       SPLIT=split, EVEN=even, DEC=dec, XL=xl, MMA=mma, PF=pf, WS=ws,
                                       PFX=pf and pfx, PF2=pf and pf2, num_warps=1)
    if split == 1:
        return part
    if not ws:
        return part.to(x2.dtype)
    out = torch.empty((M, N), device=dev, dtype=x2.dtype)
    RB = 1024
    _reduce_kernel[(-(-(M * N) // RB),)](part, out, M * N, SPLIT=split, BLOCK=RB, num_warps=4)
    return out


def packed_linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``lowbit::packed_linear``'s contract for the M range this kernel takes (see :func:`fits`):
    ``x (..., K) -> (..., N)`` in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = mm16(x2, pw)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, pw.out_features)
