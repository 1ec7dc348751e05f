"""QLoRA's 4-bit NormalFloat data type and the cost of its constants (Dettmers et al., arXiv 2305.14314, §3).

Symbols:
    k:       bits per code (4).
    δ:       the quantile offset, 1/2·(1/30 + 1/32) = 0.9677083 → the tails are cut at Φ⁻¹(δ) ≈ 1.848 σ.
    q_i:     NF4 values, quantiles of N(0, 1) normalized to [-1, 1] (eq. 4): 2^(k-1) positive quantiles
             Φ⁻¹(linspace(δ, 1/2, 2^(k-1)+1)[:-1]), 2^(k-1)-1 negative ones, and an exact 0.
    B, B₂:   block sizes of the weights (64) and of the absmax constants under double quantization (256).
    c₂:      first-level absmax constants; with double quantization stored as 8-bit codes of c₂ - mean(c₂).

The stored format itself (packing, absmax, double quantization) is :class:`lowbit.formats.codebook.Codebook`.
"""

from __future__ import annotations

import torch

__all__ = ["normal_float_values", "constants_bits_per_weight"]

QLORA_OFFSET = 0.9677083


def normal_float_values(bits: int = 4, offset: float = QLORA_OFFSET) -> torch.Tensor:
    """NF-k values (eq. 4, with bitsandbytes' asymmetric split: one more positive value and an exact zero).

    Computed in float64 with ``torch.special.ndtri`` (Φ⁻¹); returns float32 ``(2^bits,)`` sorted. At
    ``bits=4`` this reproduces the 16 values bitsandbytes hard-codes to float32 rounding.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    half = 2 ** (bits - 1)
    # Probabilities on a float32 grid (as bitsandbytes builds them), quantiles in float64, table in float32.
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half)[:-1].double())
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    return v / v.max()


def constants_bits_per_weight(block_size: int = 64, double_quant: bool = True, double_block_size: int = 256) -> float:
    """Bits of scaling constants per weight: ``32/B`` or, double-quantized, ``8/B + 32/(B·B₂)`` (§3 "Double
    Quantization": 0.5 → 0.127 bits at B=64, B₂=256), ignoring the single float32 offset."""
    if double_quant:
        return 8 / block_size + 32 / (block_size * double_block_size)
    return 32 / block_size
