"""SpQR: GPTQ with small bilevel groups and unstructured outliers (Dettmers et al., arXiv 2306.03078).

Symbols (paper §4 and the reference ``spqr_engine.py``):

======  =====================================================================================
W       weight ``(out, in)``, updated by GPTQ's error feedback (:func:`lowbit.methods.gptq.core.gptq`)
U       upper Cholesky factor of ``H⁻¹``; ``u_j = U_jj`` scales column ``j``'s error
β₂      ``group_size``: input columns per group of first-level statistics (16)
β₁      ``stat_group_size``: output rows per group of second-level statistics (16)
τ       outlier threshold ``outlier_threshold · mean_j(Var_i W_ij / u_j²)``
Δ       leave-one-out reduction of a group's error ``Σ_j ((q(w_j) - w_j)/u_j)²`` when one weight is left out
======  =====================================================================================

A weight is an outlier when, after rounding, its scaled error ``((w - q(w))/u_j)²`` exceeds τ; it is then kept
in 16 bits and contributes no error feedback. Before a group's statistics are fitted, weights whose Δ exceeds τ
(likely outliers) are replaced by the mean of the others, so they do not stretch the group's range.
"""

from __future__ import annotations

import torch

from lowbit.formats.bilevel import minmax_affine

__all__ = ["outlier_threshold", "leave_one_out_reduction", "without_likely_outliers", "average_bits"]


def outlier_threshold(W: torch.Tensor, U: torch.Tensor, relative: float) -> float:
    """``τ = relative · mean_j(Var_i W_ij / U_jj²)`` (the reference's ``outlier_scale``)."""
    return float(relative * (W.var(dim=0) / torch.diag(U).square()).mean())


def _minmax_error(x: torch.Tensor, u: torch.Tensor, bits: int) -> torch.Tensor:
    """``Σ ((q(x) - x)/u)²`` over the last dim of ``x: (..., m)``, min-max grid fitted per vector; ``u`` broadcasts."""
    flat = x.reshape(-1, x.shape[-1])
    s, z = minmax_affine(flat, bits)
    q = (torch.clamp(torch.round(flat / s + z), 0, (1 << bits) - 1) - z) * s
    return (((q - flat).reshape(x.shape) / u) ** 2).sum(-1)


def leave_one_out_reduction(Wg: torch.Tensor, u: torch.Tensor, bits: int) -> torch.Tensor:
    """``Δ: (out, g)``: how much the group's scaled rounding error falls when weight ``(i, k)`` is left out.

    Args:
        Wg: one group ``(out, g)``.
        u: ``diag(U)`` of the group's columns, ``(g,)``.
        bits: width of the min-max grid fitted per row.
    """
    out, g = Wg.shape
    if g < 2:
        return torch.zeros_like(Wg)
    k = torch.arange(g, device=Wg.device)
    loo = k[1:] - (k[:, None] >= k[1:]).long()  # (g, g-1): row k lists every column but k
    data = Wg[:, loo]  # (out, g, g-1)
    loo_err = _minmax_error(data, u[loo], bits)
    base_err = _minmax_error(Wg, u, bits)
    return base_err[:, None] - loo_err


def without_likely_outliers(Wg: torch.Tensor, likely: torch.Tensor) -> torch.Tensor:
    """``Wg`` with the ``likely`` entries replaced by the mean of the row's other entries."""
    keep = (~likely).to(Wg.dtype)
    mean = (Wg * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
    return torch.where(likely, mean, Wg)


def average_bits(bits: int, group_size: int, stat_bits: int, stat_group_size: int, shape: tuple[int, int],
                 n_outliers: int, value_bits: int = 16) -> float:
    """SpQR's average bits per weight (reference ``get_average_number_of_bits``) with lowbit's outlier layout.

    ``bits + 2·stat_bits/β₂ + 2·(16+16)/(β₂β₁) + (16 + value_bits)·k/(out·in) + 16/in``: the last term is the
    per-row outlier count (16 bits per row) that replaces CSR row pointers. Exact when ``out`` and ``in`` are
    multiples of 8, β₂ and β₁.
    """
    out, n = shape
    return (bits + 2 * stat_bits / group_size + 2 * 32 / (group_size * stat_group_size)
            + (16 + value_bits) * n_outliers / (out * n) + 16 / n)
