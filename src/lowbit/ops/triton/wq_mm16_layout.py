"""Host-side layout of the small-M W4A16 / W2A16 tensor-core kernel (:mod:`lowbit.ops.triton.wq_mm16`).

No Triton here, so the CPU test suite checks the index arithmetic that the kernel's register layouts encode.

The kernel computes ``outᵀ = W · xᵀ`` with ``mma.sync.m16n8k16``: the decoded weight tile is the MMA's A operand
(rows = output columns of the layer), taken straight from the registers its words were loaded into, and the
activations are the B operand. Each thread (lane ``4g + t`` of a one-warp program) decodes whole words of the
:mod:`lowbit.ops.repack` layout: word ``j0 + 4s + t`` of column ``n0 + I·g + i`` (``I = BR/8`` columns a thread,
loaded as one 16-byte vector for ``BR = 32``). A word of ``B``-bit codes holds ``PPW = 16/B`` code pairs ``p``
(codes ``p`` and ``p + PPW``: one LOP3 puts both in the halves of a bf16x2/fp16x2 register). The MMA's K order is
therefore not the weight's: MMA row ``ρ = 8i + g`` is layer output ``n0 + I·(ρ mod 8) + ρ div 8``, and MMA
K index ``KC·s + 16·kb + 8·h + 2·t + e`` (``p = 2·kb + h``, ``KC = 8·PPW`` weights per four words) is weight row
``KC·s + 2·PPW·t + p + PPW·e`` of the tile. The activations are gathered once per call into that order
(:func:`x_source_index`), laid out so that each thread's B fragments of one ``KC`` chunk are ``2·PPW`` contiguous
values (one or two 16-byte loads): memory position ``KC·s + 2·PPW·t + v`` with ``v = 4·kb + 2·h + e``.
"""

from __future__ import annotations

import torch

__all__ = ["pairs_per_word", "x_source_index", "mma_row_to_column", "mma_k_to_weight_row", "mma_k_to_x_position"]


def pairs_per_word(bits: int) -> int:
    """Code pairs in one int32 word of ``bits``-bit codes (2 and 4 bits: one plane)."""
    if bits not in (2, 4):
        raise ValueError(f"the small-M tensor-core kernel takes bits 2 or 4 (one bit plane), got {bits!r}")
    return 16 // bits


def x_source_index(K_total: int, bits: int) -> torch.Tensor:
    """For each memory position ``j < K_total`` of the gathered activations, the weight row (in the kernel's K
    order, before act-order's ``perm``) whose activation it holds: ``int64 (K_total,)``. ``K_total`` must be a
    multiple of ``KC = 8·PPW`` (32 for 4-bit codes, 64 for 2-bit)."""
    P = pairs_per_word(bits)
    KC = 8 * P
    if K_total % KC:
        raise ValueError(f"K_total={K_total} must be a multiple of {KC} for {bits}-bit codes")
    j = torch.arange(K_total, dtype=torch.int64)
    v = j % (2 * P)
    kb, h, e = v // 4, (v // 2) % 2, v % 2
    return j - v + 2 * kb + h + P * e


def mma_row_to_column(BR: int) -> torch.Tensor:
    """Layer output column (offset from the program's first) of each MMA row ``ρ < BR``."""
    rho = torch.arange(BR, dtype=torch.int64)
    return (BR // 8) * (rho % 8) + rho // 8


def mma_k_to_weight_row(BK: int, bits: int) -> torch.Tensor:
    """Weight row (offset in the K-tile) that MMA K index ``k < BK`` multiplies, from the decode's register
    order: ``k = KC·s + 16·kb + 8·h + 2·t + e`` ↔ row ``KC·s + 2·PPW·t + (2·kb + h) + PPW·e``."""
    P = pairs_per_word(bits)
    KC = 8 * P
    k = torch.arange(BK, dtype=torch.int64)
    s, r = k // KC, k % KC
    kb, h, t, e = r // 16, (r // 8) % 2, (r // 2) % 4, r % 2
    return KC * s + 2 * P * t + (2 * kb + h) + P * e


def mma_k_to_x_position(BK: int, bits: int) -> torch.Tensor:
    """Memory position (offset in the K-tile of the gathered activations) that the B operand reads for MMA K index
    ``k < BK``: ``KC·s + 2·PPW·t + 4·kb + 2·h + e`` (one thread's ``2·PPW`` values of a chunk are contiguous)."""
    P = pairs_per_word(bits)
    KC = 8 * P
    k = torch.arange(BK, dtype=torch.int64)
    s, r = k // KC, k % KC
    kb, h, t, e = r // 16, (r // 8) % 2, (r // 2) % 4, r % 2
    return KC * s + 2 * P * t + 4 * kb + 2 * h + e
