"""SmoothQuant's smoothing factors (arXiv 2211.10438, Sec. 4, Eq. 4), the pure math.

Symbols:

======  ==============================================================================
X       activations ``(T, C_i)``; ``max|X_j|`` is the calibrated per-channel absmax
W       weights ``(C_o, C_i)`` of every Linear that reads ``X`` (q/k/v, or gate/up)
α       migration strength (0.5 paper default; 0.8-0.85 for Llama)
s       smoothing factors ``(C_i,)``: ``s_j = max|X_j|^α / max|W_j|^(1-α)``
======  ==============================================================================

``Y = (X diag(s)⁻¹)(diag(s) Wᵀ)``: the activation is divided by ``s`` (folded into the preceding norm) and the
weight's input columns multiplied by it.
"""

from __future__ import annotations

import torch

__all__ = ["smoothing_factors"]


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float,
                      eps: float = 1e-5) -> torch.Tensor:
    """``s_j = max|X_j|^α / max_k max|W^(k)_{:,j}|^(1-α)`` (both clamped at ``eps``, as the reference does).

    Args:
        act_absmax: ``(C_i,)`` per-channel ``max|X_j|``.
        weights: the ``(C_o^(k), C_i)`` weights sharing the input ``X``.
        alpha: in ``[0, 1]``.
    Returns:
        ``s: (C_i,)`` float32.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} out of range; valid: 0 <= alpha <= 1")
    w_max = torch.stack([w.detach().abs().to(torch.float32).amax(dim=0) for w in weights]).amax(dim=0).clamp(min=eps)
    a = act_absmax.to(torch.float32).clamp(min=eps)
    return (a.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=eps)
