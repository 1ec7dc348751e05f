"""QLoRA's 4-bit NormalFloat data type and the cost of its constants (Dettmers et al., arXiv 2305.14314, §3).

Symbols:
    k:       bits per code (4).
    δ:       the quantile offset, 1/2·(1/30 + 1/32) = 0.9677083 → the tails are cut at Φ⁻¹(δ) ≈ 1.848 σ.
    q_i:     NF4 values, quantiles of N(0, 1) normalized to [-1, 1] (eq. 4): 2^(k-1) positive quantiles
             Φ⁻¹(linspace(δ, 1/2, 2^(k-1)+1)[:-1]), 2^(k-1)-1 negative ones, and an exact 0.
    B, B₂:   block sizes of the weights (64) and of the absmax constants under double quantization (256).
    c₂:      first-level absmax constants; with double quantization stored as 8-bit codes of c₂ - mean(c₂).

The stored format itself (packing, absmax, double quantization) is :class:`lowbit.formats.codebook.Codebook`;
the NF-k table builder :func:`normal_float_values` lives beside it (formats may not import methods).
"""

from __future__ import annotations

from lowbit.formats.codebook import QLORA_OFFSET, normal_float_values

__all__ = ["normal_float_values", "constants_bits_per_weight", "QLORA_OFFSET"]


def constants_bits_per_weight(block_size: int = 64, double_quant: bool = True, double_block_size: int = 256) -> float:
    """Bits of scaling constants per weight: ``32/B`` or, double-quantized, ``8/B + 32/(B·B₂)`` (§3 "Double
    Quantization": 0.5 → 0.127 bits at B=64, B₂=256), ignoring the single float32 offset."""
    if double_quant:
        return 8 / block_size + 32 / (block_size * double_block_size)
    return 32 / block_size
