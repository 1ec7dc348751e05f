"""Fused 8-bit block-wise AdamW step (Dettmers et al., arXiv 2110.02861): one pass per element.

Reads θ (fp32), g, the uint8 state codes and their per-block absmax; dequantizes (``code[q] · absmax``),
applies :func:`lowbit.optim.core.adam_rule` (decoupled decay), requantizes each state block of
``BLOCK_SIZE`` elements to the nearest code (the number of the 255 sorted midpoints below the value, the same
rule as ``torch.bucketize`` in :func:`lowbit.optim.blockwise.quantize_blockwise`: a bucket table indexed by the
float's sign/exponent/top mantissa bits gives the count up to at most ``D`` midpoints, then ``D`` compares;
``first_guess=False`` runs the 8-step binary search instead), and writes θ, codes and absmax.
The second moment's codes follow ``keep_nonzero`` (a nonzero v never takes the 0 code), as in
:class:`lowbit.optim.AdamW8bit`, which calls this kernel for its CUDA parameters.
Bytes per element: 4 + 4 (θ) + 4 (g, fp32) + 2 + 2 (codes) = 16, plus 2 × 8 per block.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lowbit.ops.triton._libm import _div_rn, _sqrt_rn


@triton.jit
def _nearest(mid_ptr, x):
    """Number of midpoints (255, ascending) strictly below ``x``: the nearest code, ties to the lower."""
    idx = tl.zeros(x.shape, dtype=tl.int32)
    for sh in tl.static_range(7, -1, -1):
        cand = idx + (1 << sh)
        mv = tl.load(mid_ptr + cand - 1, mask=cand <= 255, other=float("inf"))
        idx = tl.where(mv < x, cand, idx)
    return idx


@triton.jit
def _nearest_fg(lut_ptr, mid_ptr, x, MB: tl.constexpr, KEY0: tl.constexpr, NK: tl.constexpr, D: tl.constexpr):
    """Same result as :func:`_nearest` with 1 + ``D`` independent gathers instead of 8 dependent ones.

    The sign and the top exponent/mantissa bits of ``x`` pick a bucket; ``lut`` holds the number of midpoints
    below the bucket (built by :func:`first_guess_table`), and at most ``D`` midpoints lie inside it.
    """
    u = x.to(tl.int32, bitcast=True)
    key = tl.minimum(tl.maximum(((u & 0x7FFFFFFF) >> (23 - MB)) - KEY0, 0), NK - 1)
    key = tl.where(u < 0, key + NK, key)
    lo = tl.load(lut_ptr + key).to(tl.int32)
    idx = lo
    for j in tl.static_range(D):
        mv = tl.load(mid_ptr + lo + j, mask=lo + j < 255, other=float("inf"))
        idx += (mv < x).to(tl.int32)
    return idx


FG_MB, FG_E = 6, 24  # buckets: sign × 2^6 mantissa steps × 24 binades below 1 (smallest 8-bit dynamic midpoint ~1.6e-7)
_FG_CACHE: dict = {}


def first_guess_table(code: torch.Tensor, MB: int = FG_MB, E: int = FG_E) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(lut uint8 (2·NK,), midpoints (255,), D)`` for :func:`_nearest_fg` (cached per code tensor).

    Bucket ``key`` covers ``|x|`` in ``[bits(key << (23-MB)), bits((key+1) << (23-MB)))`` (the lowest bucket
    from 0); ``lut`` = number of midpoints below the bucket's lower end (positive ``x``) or below ``-upper end``
    (negative ``x``); ``D`` = the most midpoints inside one bucket, so the answer lies in ``[lut, lut + D]``.
    """
    ck = (code.data_ptr(), code.device, code._version, MB, E)
    hit = _FG_CACHE.get(ck)
    if hit is not None:
        return hit
    mid = ((code[1:] + code[:-1]) * 0.5).float().contiguous()
    m64 = mid.cpu()
    key0, nk = (127 - E) << MB, (E << MB) + 1
    keys = torch.arange(key0, key0 + nk, dtype=torch.int64)
    low = (keys << (23 - MB)).to(torch.int32).view(torch.float32)
    high = ((keys + 1) << (23 - MB)).to(torch.int32).view(torch.float32)
    low[0] = 0.0
    cnt = lambda v: torch.searchsorted(m64, v.contiguous())  # noqa: E731 (midpoints < v)
    lo_p, hi_p, lo_n, hi_n = cnt(low), cnt(high), cnt(-high), cnt(-low)
    D = int(max((hi_p - lo_p).max(), (hi_n - lo_n).max()))
    lut = torch.cat([lo_p, lo_n]).to(torch.uint8).to(code.device)
    out = (lut, mid, D)
    if len(_FG_CACHE) > 16:
        _FG_CACHE.clear()
    _FG_CACHE[ck] = out
    return out


@triton.jit
def _adamw8_kernel(p_ptr, g_ptr, mq_ptr, ma_ptr, vq_ptr, va_ptr, cbm_ptr, cbv_ptr, midm_ptr, midv_ptr, lutm_ptr,
                   lutv_ptr, n, lr, beta1, beta2, eps, decay, step_size, bias2_sqrt, zero_v,
                   BS: tl.constexpr, R: tl.constexpr, FG: tl.constexpr, MB: tl.constexpr, KEY0: tl.constexpr,
                   NK: tl.constexpr, DM: tl.constexpr, DV: tl.constexpr, EVL: tl.constexpr, CML: tl.constexpr,
                   EVS: tl.constexpr, CMS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * R + tl.arange(0, R)
    offs = rows[:, None] * BS + tl.arange(0, BS)[None, :]
    mk = offs < n
    nblocks = tl.cdiv(n, BS)
    mr = rows < nblocks
    # streaming operands, each read and written once: EVL/CML and EVS/CMS are the loads' and stores'
    # eviction_policy / cache_modifier ("" = Triton's default)
    p = tl.load(p_ptr + offs, mask=mk, other=0.0, eviction_policy=EVL, cache_modifier=CML)
    g = tl.load(g_ptr + offs, mask=mk, other=0.0, eviction_policy=EVL, cache_modifier=CML).to(tl.float32)
    mq = tl.load(mq_ptr + offs, mask=mk, other=0, eviction_policy=EVL, cache_modifier=CML).to(tl.int32)
    vq = tl.load(vq_ptr + offs, mask=mk, other=0, eviction_policy=EVL, cache_modifier=CML).to(tl.int32)
    ma = tl.load(ma_ptr + rows, mask=mr, other=0.0)
    va = tl.load(va_ptr + rows, mask=mr, other=0.0)
    m = tl.load(cbm_ptr + mq) * ma[:, None]
    v = tl.load(cbv_ptr + vq) * va[:, None]
    m = m * beta1 + (1.0 - beta1) * g
    v = v * beta2 + (1.0 - beta2) * (g * g)
    p = p * decay
    denom = _div_rn(_sqrt_rn(v), bias2_sqrt) + eps
    p = p + step_size * _div_rn(m, denom)
    tl.store(p_ptr + offs, p, mask=mk, eviction_policy=EVS, cache_modifier=CMS)
    m = tl.where(mk, m, 0.0)
    v = tl.where(mk, v, 0.0)
    tiny = 1.1754943508222875e-38
    am = tl.max(tl.abs(m), axis=1)
    av = tl.max(tl.abs(v), axis=1)
    xm = _div_rn(m, tl.maximum(am, tiny)[:, None])
    xv = _div_rn(v, tl.maximum(av, tiny)[:, None])
    if FG:
        qm = _nearest_fg(lutm_ptr, midm_ptr, xm, MB, KEY0, NK, DM)
        qv = _nearest_fg(lutv_ptr, midv_ptr, xv, MB, KEY0, NK, DV)
    else:
        qm = _nearest(midm_ptr, xm)
        qv = _nearest(midv_ptr, xv)
    # keep_nonzero for v (as lowbit.optim stores it): a nonzero v (v >= 0 always) never takes the 0 code, index
    # zero_v (-1 if the code has none), but the next one up
    qv += ((qv == zero_v) & (xv > 0.0)).to(tl.int32)
    tl.store(mq_ptr + offs, qm.to(tl.uint8), mask=mk, eviction_policy=EVS, cache_modifier=CMS)
    tl.store(vq_ptr + offs, qv.to(tl.uint8), mask=mk, eviction_policy=EVS, cache_modifier=CMS)
    tl.store(ma_ptr + rows, am, mask=mr)
    tl.store(va_ptr + rows, av, mask=mr)


HINTS = {  # name: (loads' eviction_policy, loads' cache_modifier, stores' eviction_policy, stores' cache_modifier)
    "": ("", "", "", ""),
    "evict_first": ("evict_first", "", "evict_first", ""),
    "evict_first_loads": ("evict_first", "", "", ""),
    "cg_cs": ("", ".cg", "", ".cs"),
    "cs_stores": ("", "", "", ".cs"),
}

_ZERO_CACHE: dict = {}


def _zero_index(code: torch.Tensor) -> int:
    """Index of the 0 entry of ``code`` (-1 if none), cached per code tensor (one host read per code)."""
    ck = (code.data_ptr(), code.device, code._version)
    if ck not in _ZERO_CACHE:
        z = (code == 0).nonzero()
        _ZERO_CACHE[ck] = int(z[0, 0]) if z.numel() else -1
    return _ZERO_CACHE[ck]


def adamw8bit_step_(p: torch.Tensor, g: torch.Tensor, m_q: torch.Tensor, m_absmax: torch.Tensor,
                    v_q: torch.Tensor, v_absmax: torch.Tensor, code_m: torch.Tensor, code_v: torch.Tensor,
                    step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                    block_size: int = 256, rows: int | None = None, num_warps: int | None = None,
                    first_guess: bool = True, hints: str = "") -> None:
    """In place: one AdamW step on fp32 ``p`` with 8-bit block-wise states (see module docstring).

    ``rows`` state blocks per program, ``num_warps`` and ``hints`` (a key of :data:`HINTS`: cache hints on the
    streaming loads and stores) change only speed, never a result bit. Defaults: one block per program and one
    warp per 256 elements (8 per thread), the fastest of ``benchmarks/gpu.py --adam-sweep`` at block size 256
    on the H100 (1.74-1.79 ms vs 2.00-2.02 ms for the former 4 blocks / 4 warps over 281M parameters, two runs);
    other block sizes were not swept.
    """
    if hints not in HINTS:
        raise ValueError(f"hints must be one of {sorted(HINTS)}, got {hints!r}")
    evl, cml, evs, cms = HINTS[hints]
    n = p.numel()
    lut_m, mid_m, dm = first_guess_table(code_m)
    lut_v, mid_v, dv = first_guess_table(code_v)
    R = rows or 1
    num_warps = num_warps or max(1, min(8, block_size // 256))
    grid = (triton.cdiv(triton.cdiv(n, block_size), R),)
    _adamw8_kernel[grid](p, g, m_q, m_absmax, v_q, v_absmax, code_m, code_v, mid_m, mid_v, lut_m, lut_v, n,
                         lr, beta1, beta2, eps, 1.0 - lr * weight_decay, -lr / (1.0 - beta1**step),
                         math.sqrt(1.0 - beta2**step), _zero_index(code_v), BS=block_size, R=R, FG=first_guess,
                         MB=FG_MB, KEY0=(127 - FG_E) << FG_MB, NK=(FG_E << FG_MB) + 1, DM=dm, DV=dv,
                         EVL=evl, CML=cml, EVS=evs, CMS=cms, num_warps=num_warps)
