"""Fused 8-bit block-wise AdamW step (Dettmers et al., arXiv 2110.02861): one pass per element.

Reads θ (fp32), g, the uint8 state codes and their per-block absmax; dequantizes (``code[q] · absmax``),
applies :func:`lowbit.optim.core.adam_rule` (decoupled decay), requantizes each state block of
``BLOCK_SIZE`` elements to the nearest code (a binary search over the 255 sorted midpoints, the same rule
as ``torch.bucketize`` in :func:`lowbit.optim.blockwise.quantize_blockwise`), and writes θ, codes and absmax.
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
def _adamw8_kernel(p_ptr, g_ptr, mq_ptr, ma_ptr, vq_ptr, va_ptr, cbm_ptr, cbv_ptr, midm_ptr, midv_ptr, n,
                   lr, beta1, beta2, eps, decay, step_size, bias2_sqrt,
                   BS: tl.constexpr, R: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * R + tl.arange(0, R)
    offs = rows[:, None] * BS + tl.arange(0, BS)[None, :]
    mk = offs < n
    nblocks = tl.cdiv(n, BS)
    mr = rows < nblocks
    p = tl.load(p_ptr + offs, mask=mk, other=0.0)
    g = tl.load(g_ptr + offs, mask=mk, other=0.0).to(tl.float32)
    mq = tl.load(mq_ptr + offs, mask=mk, other=0).to(tl.int32)
    vq = tl.load(vq_ptr + offs, mask=mk, other=0).to(tl.int32)
    ma = tl.load(ma_ptr + rows, mask=mr, other=0.0)
    va = tl.load(va_ptr + rows, mask=mr, other=0.0)
    m = tl.load(cbm_ptr + mq) * ma[:, None]
    v = tl.load(cbv_ptr + vq) * va[:, None]
    m = m * beta1 + (1.0 - beta1) * g
    v = v * beta2 + (1.0 - beta2) * (g * g)
    p = p * decay
    denom = _div_rn(_sqrt_rn(v), bias2_sqrt) + eps
    p = p + step_size * _div_rn(m, denom)
    tl.store(p_ptr + offs, p, mask=mk)
    m = tl.where(mk, m, 0.0)
    v = tl.where(mk, v, 0.0)
    tiny = 1.1754943508222875e-38
    am = tl.max(tl.abs(m), axis=1)
    av = tl.max(tl.abs(v), axis=1)
    qm = _nearest(midm_ptr, _div_rn(m, tl.maximum(am, tiny)[:, None]))
    qv = _nearest(midv_ptr, _div_rn(v, tl.maximum(av, tiny)[:, None]))
    tl.store(mq_ptr + offs, qm.to(tl.uint8), mask=mk)
    tl.store(vq_ptr + offs, qv.to(tl.uint8), mask=mk)
    tl.store(ma_ptr + rows, am, mask=mr)
    tl.store(va_ptr + rows, av, mask=mr)


def adamw8bit_step_(p: torch.Tensor, g: torch.Tensor, m_q: torch.Tensor, m_absmax: torch.Tensor,
                    v_q: torch.Tensor, v_absmax: torch.Tensor, code_m: torch.Tensor, code_v: torch.Tensor,
                    step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                    block_size: int = 256, rows: int | None = None, num_warps: int = 4) -> None:
    """In place: one AdamW step on fp32 ``p`` with 8-bit block-wise states (see module docstring)."""
    n = p.numel()
    mid_m = ((code_m[1:] + code_m[:-1]) * 0.5).contiguous()
    mid_v = ((code_v[1:] + code_v[:-1]) * 0.5).contiguous()
    R = rows or max(1, 1024 // block_size)
    grid = (triton.cdiv(triton.cdiv(n, block_size), R),)
    _adamw8_kernel[grid](p, g, m_q, m_absmax, v_q, v_absmax, code_m, code_v, mid_m, mid_v, n,
                         lr, beta1, beta2, eps, 1.0 - lr * weight_decay, -lr / (1.0 - beta1**step),
                         math.sqrt(1.0 - beta2**step), BS=block_size, R=R, num_warps=num_warps)
