"""ZeroQuant-FP's low-rank compensation (LoRC, from ZeroQuant-V2, arXiv 2303.08302, Sec. 5; used in
arXiv 2307.09782), the pure math.

Symbols:

=====  ==================================================================
W      float weight ``(d_out, d_in)``
Ŵ      its quantized (dequantized) weight
E      quantization error ``W - Ŵ``
r      LoRC rank
U, Σ, V  SVD of ``E = U Σ Vᵀ``
Û, V̂   ``Û = U_r Σ_r^{1/2}: (d_out, r)``, ``V̂ = Σ_r^{1/2} V_rᵀ: (r, d_in)``; ``W ≈ Ŵ + Û V̂``
=====  ==================================================================
"""

from __future__ import annotations

import torch

__all__ = ["lorc"]


def lorc(W: torch.Tensor, W_hat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``r`` correction of the quantization error (Eckart-Young): returns ``(Û, V̂)``.

    Args:
        W, W_hat: ``(d_out, d_in)``.
        rank: ``1 ≤ r ≤ min(d_out, d_in)``.
    Returns:
        ``Û: (d_out, r)``, ``V̂: (r, d_in)`` float32 with ``Û V̂`` the truncated SVD of ``W - Ŵ``.
    """
    if not 1 <= rank <= min(W.shape):
        raise ValueError(f"LoRC rank={rank} out of range; valid: 1..{min(W.shape)} for a weight of shape {tuple(W.shape)}")
    E = (W.to(torch.float64) - W_hat.to(torch.float64))
    # The top singular pairs from the eigendecomposition of the smaller Gram matrix (float64): the same
    # optimum as a full SVD, 2.7-4.9x faster on the default model's shapes (benchmarks/cpu_hotspots.py).
    wide = E.shape[0] <= E.shape[1]
    G = E @ E.T if wide else E.T @ E
    evals, evecs = torch.linalg.eigh(G)  # ascending
    top = evecs[:, -rank:].flip(1)  # (min dim, r): left singular vectors if wide, else right
    S = evals[-rank:].flip(0).clamp(min=0).sqrt()
    other = (top.T @ E if wide else E @ top)  # S·Vh (r, d_in) if wide, else U·S (d_out, r)
    r = S.sqrt()
    inv = torch.where(r > 0, 1 / r, torch.zeros_like(r))  # a zero singular value: its pair contributes nothing
    if wide:
        return (top * r).to(torch.float32), (other * inv.unsqueeze(1)).to(torch.float32)
    return (other * inv).to(torch.float32), (r.unsqueeze(1) * top.T).to(torch.float32)
