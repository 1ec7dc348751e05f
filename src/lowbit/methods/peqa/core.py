"""PEQA: parameter-efficient, quantization-aware adaptation (Kim et al., NeurIPS 2023, arXiv 2305.14152).

A weight quantized per output channel (or per group) keeps its integer codes and zero points frozen; only
the scales train:

    Ŵ = (s₀ + Δs) ⊙ (W̄ − z₀)

so after tuning the layer is still an ordinary integer-quantized layer with new scales. The gradient of the
loss with respect to a scale is ``∂L/∂s[o, g] = Σ_{j ∈ g} ∂L/∂Ŵ[o, j] · (W̄ − z₀)[o, j]`` (autograd computes
it from :func:`dequantize`, written in differentiable tensor ops).

Symbols:

| symbol | meaning | shape |
|--------|---------|-------|
| W̄      | integer codes | (d_out, d_in) |
| z₀     | zero points (frozen) | (d_out, n_groups) |
| s = s₀ + Δs | scales (trainable) | (d_out, n_groups) |
| g(j)   | group of input column j | (d_in,) |
"""

from __future__ import annotations

import torch

__all__ = ["dequantize", "scale_grad"]


def dequantize(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``Ŵ = s[:, g] ⊙ (W̄ − z[:, g])``: codes ``(d_out, d_in)``, ``s``/``z`` ``(d_out, n_groups)``,
    ``groups (d_in,)`` -> ``(d_out, d_in)`` in ``s``'s dtype; differentiable in ``s``."""
    return s[:, groups] * (codes.to(s.dtype) - z.to(s.dtype)[:, groups])


def scale_grad(grad_W: torch.Tensor, codes: torch.Tensor, z: torch.Tensor, groups: torch.Tensor,
               n_groups: int) -> torch.Tensor:
    """``∂L/∂s`` from ``∂L/∂Ŵ (d_out, d_in)``: ``(d_out, n_groups)`` (the textbook form, for tests)."""
    contrib = grad_W * (codes.to(grad_W.dtype) - z.to(grad_W.dtype)[:, groups])
    out = torch.zeros(grad_W.shape[0], n_groups, dtype=grad_W.dtype, device=grad_W.device)
    return out.index_add_(1, groups, contrib)
