"""Q8BERT: quantization-aware training of BERT with symmetric linear 8-bit quantization
(Zafrir et al., arXiv 1910.06188, Sec. 2-3).

    S_x = (2^(b−1) − 1) / M_x              (scale from a threshold M_x; 127/M_x at 8 bits)
    quant(x) = clamp(round(x · S_x), −127, 127)
    fake(x)  = quant(x) / S_x               (forward)
    ∂fake/∂x ≈ 1                            (straight-through estimator, backward)

Weights use ``M_W = max|W|`` of the current weight (every step); activations (inputs of each FC layer) use
an exponential moving average of ``max|x|`` over training batches, ``M_x ← d·M_x + (1 − d)·max|x|`` with
``d = 0.9999``, started from the first batch's value.

Symbols:

| symbol | meaning |
|--------|---------|
| b      | bits (8) |
| M_x, M_W | thresholds (activation EMA, weight absmax) |
| S_x, S_W | scales |
| d      | EMA decay |
"""

from __future__ import annotations

import torch

__all__ = ["scale_for", "quantize", "fake_quantize_ste", "ema"]


def scale_for(M: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``S = (2^(b−1) − 1) / M`` (``M`` clamped away from 0)."""
    return (2 ** (bits - 1) - 1) / M.clamp_min(1e-12)


def quantize(x: torch.Tensor, S: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Integer codes ``clamp(round(x·S), −(2^(b−1)−1), 2^(b−1)−1)`` (float tensor of integers)."""
    q = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x * S), -q, q)


def fake_quantize_ste(x: torch.Tensor, M: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``quant(x)/S`` in the forward pass, identity gradient in the backward pass (STE)."""
    S = scale_for(M.detach(), bits)
    return x + (quantize(x, S, bits) / S - x).detach()


def ema(M: torch.Tensor, value: torch.Tensor, d: float) -> torch.Tensor:
    """``d·M + (1 − d)·value``."""
    return d * M + (1.0 - d) * value
