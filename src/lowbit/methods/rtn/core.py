"""Round-to-nearest (RTN), the calibration-free baseline of every weight-quantization paper
(e.g. GPTQ, arXiv 2210.17323, Table 3 "RTN").

Symbols:
    W: (out_features, in_features) float weight.
    Q(W; θ): the format's quantizer with parameters θ (scale/zero point per group, absmax per block, ...).
    θ_RTN: the format's closed-form choice (min/max for asymmetric integer grids, absmax otherwise).

RTN is ``Q(W; θ_RTN(W))``: every weight goes to its nearest grid point, independently of the others.
"""

from __future__ import annotations

import torch

from lowbit.formats.base import Format, QuantizedTensor

__all__ = ["rtn"]


def rtn(W: torch.Tensor, fmt: Format) -> QuantizedTensor:
    """``Q(W; θ_RTN(W))`` for ``W: (out, in)`` in format ``fmt``."""
    return fmt.quantize(W, **fmt.params(W))
