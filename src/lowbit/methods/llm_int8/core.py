"""LLM.int8() math in float64, the textbook form of the paper (arXiv 2208.07339, Sec. 3, Eq. 1-3).

Symbols:

=========  ===================================================================
X          inputs ``(s, h)`` (tokens × hidden)
W          weight ``(o, h)`` (``Wᵀ`` is the paper's ``W_f16 (h, o)``)
α          outlier threshold (6.0)
O          outlier feature set ``{i : max_t |X_ti| ≥ α}``
c_x, c_w   vector-wise absmax: per row of ``X`` over non-outlier features, per row of ``W``
=========  ===================================================================

``C ≈ Σ_{i∈O} X_{:,i} W_{:,i}ᵀ + (c_x ⊗ c_w / 127²) · (X_I8 W_I8ᵀ)`` over the features not in ``O``.
The production path is :func:`lowbit.formats.int8_rowwise.int8_mixed_linear` (integer GEMM); this one keeps the
float weight for the outlier columns, as the paper does, and is the oracle the tests use.
"""

from __future__ import annotations

import torch

__all__ = ["outlier_features", "vectorwise_absmax_quant", "int8_decomposed_matmul"]


def outlier_features(X: torch.Tensor, alpha: float) -> torch.Tensor:
    """Indices ``O`` of the feature columns of ``X: (s, h)`` with any ``|x| ≥ α`` (empty for ``α = 0``)."""
    if alpha <= 0:
        return torch.empty(0, dtype=torch.long, device=X.device)
    return torch.nonzero((X.abs() >= alpha).any(dim=0)).flatten()


def vectorwise_absmax_quant(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 (Eq. 1 per row): ``A ≈ A_I8 · c / 127`` with ``c = max|A_row|``.

    Returns ``(A_I8 (rows, cols) int8 values as float64, c (rows, 1))``.
    """
    c = A.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    return torch.round(A * 127.0 / c).clamp(-127, 127), c


def int8_decomposed_matmul(X: torch.Tensor, W: torch.Tensor, alpha: float) -> torch.Tensor:
    """``X Wᵀ`` with LLM.int8()'s decomposition (Eq. 3), float64, float weights in the outlier columns.

    Args:
        X: ``(s, h)``; W: ``(o, h)``; alpha: outlier threshold (0: plain vector-wise int8).
    Returns:
        ``(s, o)`` float64.
    """
    X, W = X.to(torch.float64), W.to(torch.float64)
    O = outlier_features(X, alpha)
    keep = torch.ones(X.shape[1], dtype=torch.bool, device=X.device)
    keep[O] = False
    Xi, cx = vectorwise_absmax_quant(X[:, keep])
    Wi, cw = vectorwise_absmax_quant(W)  # weight rows over all features, as the paper and bitsandbytes do
    Wi = Wi[:, keep]
    C = (cx * cw.T / 127.0 ** 2) * (Xi @ Wi.T)
    return C + X[:, O] @ W[:, O].T
