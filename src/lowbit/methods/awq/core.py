"""AWQ's scale and clip searches (arXiv 2306.00978, Sec. 3.2, Eq. 4-5), the pure math.

Symbols:

=======  ===========================================================================
X        inputs of the balance layers ``(T, C_i)``; ``s_X = mean|X|`` per input channel
W        weight ``(C_o, C_i)``; ``s_W`` = per-input-channel mean of ``|W| / max|W|`` in its group
α        exponent searched on the grid ``{0, 1/n, …, (n-1)/n}`` (``n = 20``)
s        per-input-channel scale ``s_X^α`` (or ``s_X^α / s_W^(1-α)``, duo scaling), normalised by
         ``sqrt(max s · min s)``
Q        the weight quantizer (any format's fake-quantize)
L(s)     ``‖f(X; Q(W·diag(s))·diag(s)⁻¹) - f(X; W)‖²`` over the inspected sub-module ``f``
=======  ===========================================================================

Clipping: per (row, group), ``max_val = (1 - i/n)·max|W|`` for ``i < n·max_shrink``, minimising the group's
partial output error ``mean_t (Σ_{j∈g} X_tj (Q(W)_oj - W_oj))²``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["weight_group_mean", "scale_for_alpha", "search_scale", "group_gram", "search_clip"]


def weight_group_mean(weights: list[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """``s_W``: per input channel, the mean over output rows of ``|W| / max|W|`` within each group.

    Args:
        weights: ``(C_o^(k), C_i)`` weights sharing the input; group_size: None for whole rows.
    Returns:
        ``(C_i,)`` float32.
    """
    W = torch.cat([w.detach().to(torch.float32) for w in weights], dim=0).abs()
    C_o, C_i = W.shape
    g = group_size or C_i
    ng = -(-C_i // g)
    Wp = torch.nn.functional.pad(W, (0, ng * g - C_i)).view(C_o, ng, g)
    rel = Wp / Wp.amax(dim=2, keepdim=True).clamp(min=1e-12)
    return rel.view(C_o, ng * g)[:, :C_i].mean(dim=0)


def scale_for_alpha(x_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """``s = s_X^α`` (or ``s_X^α / (s_W^(1-α) + 1e-4)`` with ``w_mean``), normalised by ``sqrt(max·min)``."""
    if w_mean is None:
        s = x_mean.to(torch.float32).pow(alpha).clamp(min=1e-4)
    else:
        s = (x_mean.to(torch.float32).pow(alpha) / (w_mean.to(torch.float32).pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    s[~torch.isfinite(s)] = 1.0
    return s


def search_scale(loss: Callable[[torch.Tensor], float], x_mean: torch.Tensor, n_grid: int = 20,
                 w_mean: torch.Tensor | None = None) -> tuple[torch.Tensor, float, list[float]]:
    """Grid search of Eq. 5: ``α* = argmin_α L(s(α))`` over ``α ∈ {i/n_grid : i < n_grid}``.

    Args:
        loss: ``L(s)`` for a candidate ``s: (C_i,)``.
        x_mean: ``s_X: (C_i,)``; w_mean: ``s_W`` for duo scaling, or None.
    Returns:
        ``(s*, α*, losses)`` with ``losses[i] = L(s(i/n_grid))``.
    """
    if n_grid < 1:
        raise ValueError(f"n_grid={n_grid} must be >= 1")
    losses: list[float] = []
    best: tuple[float, int] = (float("inf"), -1)
    for i in range(n_grid):
        val = float(loss(scale_for_alpha(x_mean, i / n_grid, w_mean)))
        losses.append(val)
        if val < best[0]:
            best = (val, i)
    if best[1] < 0:
        raise ValueError(f"AWQ scale search found no finite loss (losses={losses[:3]}...)")
    alpha = best[1] / n_grid
    return scale_for_alpha(x_mean, alpha, w_mean), alpha, losses


def group_gram(X: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Per-group input second moments ``H_g = X_gᵀ X_g / T`` of ``X: (T, C_i)``, shape ``(n_groups, g, g)`` float32.

    Columns past ``C_i`` in the last group are zero (they meet zero-padded weight columns).
    """
    T, C_i = X.shape
    g = group_size or C_i
    ng = -(-C_i // g)
    Xg = torch.nn.functional.pad(X.to(torch.float32), (0, ng * g - C_i)).view(T, ng, g).transpose(0, 1)
    return torch.bmm(Xg.transpose(1, 2), Xg) / max(T, 1)


def search_clip(W: torch.Tensor, X: torch.Tensor, fake_quant: Callable[[torch.Tensor], torch.Tensor],
                group_size: int | None, n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Per (row, group) clipping threshold minimising the group's partial output error.

    The error ``mean_t (Σ_{j∈g} X_tj D_oj)²`` with ``D = Q(clip(W)) - W`` is evaluated as the quadratic form
    ``D_og H_g D_ogᵀ`` with ``H_g`` from :func:`group_gram`: the same quantity, without a ``(T, C_o, n_groups)``
    tensor per grid point (``T·C_i`` → ``g·C_i`` multiply-adds per output row).

    Args:
        W: ``(C_o, C_i)``; X: ``(T, C_i)`` sample of inputs; fake_quant: ``Q`` on a whole ``(C_o, C_i)`` weight.
        group_size: None for whole rows.
    Returns:
        ``max_val: (C_o, n_groups)``; apply with ``W.clamp(-max_val, max_val)`` per group.
    """
    C_o, C_i = W.shape
    g = group_size or C_i
    ng = -(-C_i // g)
    pad = ng * g - C_i
    Wf = W.to(torch.float32)
    H = group_gram(X, group_size)
    amax = torch.nn.functional.pad(Wf.abs(), (0, pad)).view(C_o, ng, g).amax(dim=2)
    best_err = torch.full((C_o, ng), float("inf"), device=W.device)
    best = amax.clone()
    for i in range(max(1, int(max_shrink * n_grid))):
        mv = amax * (1 - i / n_grid)
        lim = mv.repeat_interleave(g, dim=1)[:, :C_i]
        Wc = torch.maximum(torch.minimum(Wf, lim), -lim)
        D = torch.nn.functional.pad(fake_quant(Wc).to(torch.float32) - Wf, (0, pad)).view(C_o, ng, g).transpose(0, 1)
        err = (torch.bmm(D, H) * D).sum(dim=2).T  # (C_o, ng)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, mv, best)
    return best
