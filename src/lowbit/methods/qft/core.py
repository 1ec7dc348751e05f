"""QFT: quantized full-parameter tuning (Li et al., arXiv 2310.07147) — the tensor math.

Every training state is int8: weights (dense int8 per output row plus a sparse set of fp32 "critical"
entries — the dense-and-sparse hybrid quantizer), gradients and Lion's momentum (block-wise absmax codes).
Lion's update has the same magnitude ``η`` everywhere, far below one int8 step of most rows; re-rounding the
updated weight to the nearest code would erase it, so the dense part is re-rounded **stochastically**
(``E[SR(x)] = x``), which keeps the expected trajectory of the fp32 optimizer without an fp32 master copy.

Symbols:

| symbol | meaning | shape |
|--------|---------|-------|
| W      | weight | (d_out, d_in) |
| W̄      | dense int8 codes, ``|W̄| <= 127`` | (d_out, d_in) |
| s      | per-row scale, ``W ≈ s ⊙ W̄`` | (d_out, 1) |
| S      | sparse critical entries: flat indices ``idx`` and fp32 values ``val`` | (k,) |
| ρ      | fraction of entries kept in S | scalar |
| g, m   | gradient and Lion momentum (stored int8 block-wise) | like W |
| η, β1, β2, λ | Lion's learning rate, betas, weight decay | scalars |
"""

from __future__ import annotations

import torch

__all__ = ["dense_sparse_split", "row_scale", "round_codes", "dense_sparse_weight", "QMAX"]

QMAX = 127


def dense_sparse_split(W: torch.Tensor, ρ: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``ceil(ρ·numel)`` largest-magnitude entries of ``W`` apart.

    Returns:
        ``(D, idx, val)``: ``W`` with those entries zeroed ``(d_out, d_in)``, their flat indices (int64,
        sorted) and fp32 values.
    """
    if not 0.0 <= ρ < 1.0:
        raise ValueError(f"outlier fraction must be in [0, 1), got {ρ!r}")
    flat = W.reshape(-1).float()
    k = int(-(-ρ * flat.numel() // 1)) if ρ > 0 else 0
    if k == 0:
        return W.float().clone(), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    idx = torch.topk(flat.abs(), k).indices.sort().values
    D = flat.clone()
    val = D[idx].clone()
    D[idx] = 0
    return D.view_as(W), idx, val


def row_scale(D: torch.Tensor) -> torch.Tensor:
    """``s = max|D_row| / 127`` (rows of zeros get 1): ``(d_out, 1)`` fp32."""
    a = D.abs().amax(dim=1, keepdim=True).float()
    return torch.where(a > 0, a / QMAX, torch.ones_like(a))


def round_codes(X: torch.Tensor, stochastic: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round ``X`` (in units of the scale) to int8 codes in ``[-127, 127]``.

    Stochastic rounding: ``floor(X + u)``, ``u ~ U[0, 1)``, so ``E[code] = X``; nearest: ``round(X)``.
    """
    if stochastic:
        u = torch.rand(X.shape, generator=generator, device=X.device, dtype=X.dtype)
        R = torch.floor(X + u)
    else:
        R = torch.round(X)
    return R.clamp_(-QMAX, QMAX).to(torch.int8)


def dense_sparse_weight(W̄: torch.Tensor, s: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """``W = s ⊙ W̄`` with the sparse entries written in: ``(d_out, d_in)`` fp32."""
    W = W̄.float() * s
    if idx.numel():
        W.view(-1)[idx] = val
    return W
