"""Running statistics of a Linear layer's inputs, the ones a method declares in ``MethodConfig.stats``.

Each accumulator sees input batches ``X: (tokens, in_features)`` and keeps an fp32 running value, so memory is
``O(in_features²)`` for the Hessian and ``O(in_features)`` otherwise, whatever the amount of calibration data.

==================  ==========================================================  ============================
name                value after n tokens                                        shape
==================  ==========================================================  ============================
``hessian``         ``H = 2/n · Σ xᵀx``  (GPTQ, arXiv 2210.17323, eq. 1)         ``(in, in)`` fp32
``act_absmax``      ``max |x_j|``                                               ``(in,)`` fp32
``act_mean_abs``    ``1/n · Σ |x_j|``                                           ``(in,)`` fp32
``act_sq_mean``     ``1/n · Σ x_j²`` (llama.cpp's importance matrix)            ``(in,)`` fp32
==================  ==========================================================  ============================

The Fisher diagonal (``fisher``) needs gradients, not inputs: see :func:`lowbit.calibration.hooks.fisher_diagonal`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lowbit.methods.base import STAT_NAMES

__all__ = ["INPUT_STATS", "InputStats"]

INPUT_STATS: tuple[str, ...] = ("hessian", "act_absmax", "act_mean_abs", "act_sq_mean")
"""Statistics computed from a layer's inputs (all of :data:`~lowbit.methods.base.STAT_NAMES` but ``fisher``)."""


class InputStats:
    """Accumulates the requested input statistics of one Linear layer.

    Args:
        names: statistic names, a subset of :data:`INPUT_STATS`.
        in_features: the layer's input width.
        device: where the fp32 accumulators live.

    Raises:
        ValueError: for an unknown statistic name.
    """

    def __init__(self, names: Iterable[str], in_features: int, device: torch.device | str = "cpu") -> None:
        self.names = tuple(names)
        bad = [n for n in self.names if n not in INPUT_STATS]
        if bad:
            valid = INPUT_STATS if all(n in STAT_NAMES for n in bad) else STAT_NAMES
            raise ValueError(f"unknown input statistic(s) {bad}; valid choices: {list(valid)}")
        self.in_features = in_features
        self.n = 0
        z = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
        self.values: dict[str, torch.Tensor] = {}
        for name in self.names:
            self.values[name] = z(in_features, in_features) if name == "hessian" else z(in_features)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x: (..., in_features)``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, this layer expects {self.in_features}")
        X = x.detach().reshape(-1, self.in_features).to(self.values[self.names[0]].device, torch.float32)
        t = X.shape[0]
        if t == 0:
            return
        n_new = self.n + t
        old, new = self.n / n_new, 1.0 / n_new
        v = self.values
        if "hessian" in v:
            # H ← H·n/(n+t) + 2/(n+t)·XᵀX: the reference's running mean, without forming sqrt(2/n)·X copies
            v["hessian"].mul_(old).addmm_(X.T, X, alpha=2.0 * new)
        if "act_absmax" in v:
            torch.maximum(v["act_absmax"], X.abs().amax(0), out=v["act_absmax"])
        if "act_mean_abs" in v:
            v["act_mean_abs"].mul_(old).add_(X.abs().sum(0), alpha=new)
        if "act_sq_mean" in v:
            v["act_sq_mean"].mul_(old).add_(X.square().sum(0), alpha=new)
        self.n = n_new

    def result(self) -> dict[str, torch.Tensor]:
        """The statistics so far (the accumulators themselves, not copies)."""
        return dict(self.values)
