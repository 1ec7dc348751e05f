"""Half-Quadratic Quantization (HQQ): Badri & Shaji, 2023, https://mobiusml.github.io/hqq_blog/ (no arXiv id).

HQQ fits the zero point of an affine grid (the scale stays fixed) to minimise a sparsity-promoting
``l_p`` error (``p < 1``) of the dequantized weight, by half-quadratic splitting: an auxiliary error
variable ``W_e`` is solved in closed form by a generalized soft-threshold, then the zero point in closed
form by a mean, while the penalty ``β`` grows by ``κ`` each step.

Symbols (one row of ``W`` per quantization group):
    W:   (G, g) weights, one group per row.
    s:   (G, 1) step size (dequantized = (W_q - z) · s); HQQ's code uses the inverse 1/s.
    z:   (G, 1) float zero point, in code units.
    W_q: (G, g) codes, round(W / s + z) clamped to [0, 2^b - 1].
    W_r: (G, g) dequantized weights, (W_q - z) · s.
    W_e: (G, g) the sparse error variable of the splitting.
    p:   the l_p norm (0.7); β: the penalty (10); κ: its growth per step (1.01).

Iteration ``t``:
    W_q = clamp(round(W/s + z), 0, 2^b - 1);  W_r = (W_q - z)·s
    W_e = shrink_p(W - W_r, β)  with  shrink_p(x, β) = sign(x)·relu(|x| - |x|^(p-1)/β)
    z   = mean_row(W_q - (W - W_e)/s);  β = κ·β
With early stopping, the loop ends once ``mean |W - W_r|`` stops decreasing, and the zero point that gave
the smallest error is returned (the reference returns the one computed after the non-improving step).

Integer zero points (``integer_zero=True``, for formats that store the zero point as a code): the solver still
runs on a float ``z``, but every candidate is judged by the error of the grid it will actually be stored as,
``round(z)``; the start counts as a candidate, and each group keeps its own best. So the stored result is never
worse, in ``mean |W - W_r|`` per group, than the min/max start (RTN); rounding the reference's float result
afterwards, as a plain cast would, can be worse.
"""

from __future__ import annotations

import torch

__all__ = ["shrink_lp", "lp_error", "optimize_zero"]


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft-threshold: ``sign(x) · relu(|x| - |x|^(p-1) / β)`` (``p = 1``: threshold ``1/β``)."""
    a = x.abs()
    thr = torch.full_like(a, 1.0 / beta) if p == 1 else a.pow(p - 1) / beta
    return torch.sign(x) * torch.relu(a - thr)


def lp_error(W: torch.Tensor, W_r: torch.Tensor, p: float) -> torch.Tensor:
    """HQQ's objective ``Σ |W - W_r|^p`` (a scalar, in ``W``'s dtype)."""
    return (W - W_r).abs().pow(p).sum()


def optimize_zero(W: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int, *, p: float = 0.7,
                  beta: float = 10.0, kappa: float = 1.01, iters: int = 20,
                  early_stop: bool = True, integer_zero: bool = False) -> tuple[torch.Tensor, int]:
    """Run HQQ's half-quadratic solver on the zero point.

    Args:
        W: ``(G, g)`` weights, one quantization group per row (float32 or float64; computed in that dtype).
        s: ``(G, 1)`` fixed step sizes (positive).
        z: ``(G, 1)`` initial zero points (min/max init: ``-min/s``).
        qmax: largest code, ``2^bits - 1``.
        p, beta, kappa, iters, early_stop: the solver's options (see module docstring).
        integer_zero: judge candidates by their rounded zero point and return integer-valued ``z`` (see
            module docstring); ``early_stop`` is then implied per group.

    Returns:
        ``(z, steps)``: the optimized zero points ``(G, 1)`` and the number of steps run.
    """
    if integer_zero:
        return _optimize_integer_zero(W, s, z, qmax, p=p, beta=beta, kappa=kappa, iters=iters)
    s = s.to(W.dtype)
    z = z.to(W.dtype)
    best_err = torch.tensor(float("inf"), dtype=W.dtype)
    best_z = z
    steps = 0
    for _ in range(iters):
        W_q = torch.clamp(torch.round(W / s + z), 0, qmax)
        W_r = (W_q - z) * s
        err = (W - W_r).abs().mean()
        if early_stop:
            if not bool(err < best_err):
                break
            best_err, best_z = err, z
        W_e = shrink_lp(W - W_r, beta, p)
        z = (W_q - (W - W_e) / s).mean(dim=1, keepdim=True)
        beta *= kappa
        steps += 1
    return (best_z if early_stop else z), steps


def _grid_error(W: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-group ``mean |W - W_r|`` ``(G, 1)`` of the grid with step ``s`` and zero point ``z``."""
    W_r = (torch.clamp(torch.round(W / s + z), 0, qmax) - z) * s
    return (W - W_r).abs().mean(dim=1, keepdim=True)


def _optimize_integer_zero(W: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int, *, p: float,
                           beta: float, kappa: float, iters: int) -> tuple[torch.Tensor, int]:
    """HQQ's iteration on a float ``z``, keeping per group the best ``round(z)`` (the start included)."""
    s = s.to(W.dtype)
    z = z.to(W.dtype)
    best_z = z.round().clamp(0, qmax)
    best_err = _grid_error(W, s, best_z, qmax)
    for _ in range(iters):
        W_q = torch.clamp(torch.round(W / s + z), 0, qmax)
        W_e = shrink_lp(W - (W_q - z) * s, beta, p)
        z = (W_q - (W - W_e) / s).mean(dim=1, keepdim=True)
        beta *= kappa
        z_int = z.round().clamp(0, qmax)
        err = _grid_error(W, s, z_int, qmax)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_z = torch.where(better, z_int, best_z)
    return best_z, iters
