"""LoftQ: LoRA-fine-tuning-aware quantization (Li et al., ICLR 2024, arXiv 2310.08659, Algorithm 1).

Alternates quantizing the weight minus the current low-rank correction and a rank-r SVD of what the
quantization missed, so that the frozen quantized base plus the LoRA initialization start close to ``W``:

    Q_t = q_N(W − s·B_{t−1} A_{t−1})
    U Σ Vᵀ = SVD(W − Q_t)
    s·B_t A_t = U_r Σ_r V_rᵀ

LoRA scales its update by ``s = alpha / r``, so the factors are divided by ``√s`` each (peft issue #1982:
peft stores the SVD factors unscaled, which overshoots when alpha ≠ r); then ``Q + s·B A`` is the best
rank-r fit of the residual.

Symbols:

| symbol | meaning | shape |
|--------|---------|-------|
| W      | float weight | (d_out, d_in) |
| Q_t    | dequantized quantized base at step t | (d_out, d_in) |
| A      | LoRA down factor (peft ``lora_A``) | (r, d_in) |
| B      | LoRA up factor (peft ``lora_B``) | (d_out, r) |
| s      | LoRA scaling alpha / r | scalar |
| T      | alternating steps | int |
| q_N    | the N-bit quantizer (any lowbit format: quantize then dequantize) | — |
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["loftq", "low_rank"]


def low_rank(R: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``r`` factors of ``R: (d_out, d_in)`` (Eckart–Young): ``L (d_out, r)``, ``Rr (r, d_in)``,
    ``L @ Rr = U_r Σ_r V_rᵀ`` with ``√Σ`` split evenly between them."""
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    sq = S[:r].sqrt()
    return U[:, :r] * sq, sq[:, None] * Vh[:r]


def loftq(W: torch.Tensor, q_N: Callable[[torch.Tensor], torch.Tensor], r: int, T: int,
          s: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run Algorithm 1 on one weight.

    Args:
        W: ``(d_out, d_in)`` float weight.
        q_N: quantize-then-dequantize, ``(d_out, d_in) -> (d_out, d_in)`` float.
        r: LoRA rank, ``1 <= r <= min(d_out, d_in)``.
        T: alternating steps, ``>= 1``.
        s: LoRA scaling ``alpha / r``.

    Returns:
        ``(Q_T, A, B, X)``: the dequantized base, ``A (r, d_in)``, ``B (d_out, r)`` with
        ``Q_T + s·B A ≈ W``, and ``X = W − s·B_{T−1} A_{T−1}``, the matrix whose quantization gave ``Q_T``
        (quantize ``X`` with the same format to store ``Q_T``).
    """
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (d_out, d_in), got shape {tuple(W.shape)}")
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(W.shape):
        raise ValueError(f"rank r must be an int in 1..{min(W.shape)} for W of shape {tuple(W.shape)}, got {r!r}")
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"iterations T must be an int >= 1, got {T!r}")
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"LoRA scaling s must be finite and > 0, got {s!r}")
    Wf = W if W.dtype == torch.float64 else W.float()  # float64 in, float64 out (for textbook tests)
    sBA = torch.zeros_like(Wf)
    for _ in range(T):
        X = Wf - sBA
        Q = q_N(X).to(Wf.dtype)
        L, Rr = low_rank(Wf - Q, r)
        sBA = L @ Rr
    root = math.sqrt(s)
    return Q, Rr / root, L / root, X
