"""``HQQConfig``: HQQ's zero-point optimization on an ``IntAffine`` grid (calibration-free)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from lowbit.formats.affine import IntAffine
from lowbit.formats.base import QuantizedTensor, check_weight
from lowbit.methods.base import MethodConfig
from lowbit.methods.hqq.core import optimize_zero

__all__ = ["HQQConfig", "hqq_params"]

log = logging.getLogger(__name__)


def _split_groups(fmt: IntAffine, n: int) -> list[tuple[int, int, int]]:
    """``(first column, width, first group)`` of each run of equal-width groups (full groups, short tail)."""
    if fmt.per_tensor or fmt.group_size is None:
        return [(0, n, 0)]
    g = fmt.group_size
    full = n // g
    runs = [(0, full * g, 0)] if full else []
    if n % g:
        runs.append((full * g, n % g, full))
    return runs


def hqq_params(W: torch.Tensor, fmt: IntAffine, cfg: "HQQConfig") -> dict[str, torch.Tensor]:
    """HQQ's ``scale`` and optimized float ``zero_point`` ``(out, n_groups)`` for ``W: (out, in)`` in ``fmt``.

    The scale is the format's min/max choice (kept fixed, as in HQQ); the zero point is fitted per group.
    """
    p = fmt.params(W)
    scale, zero = p["scale"].float(), p["zero_point"].float()
    Wf = W.float()
    out, n = Wf.shape
    z_new = zero.clone()
    if fmt.per_tensor:
        z, _ = optimize_zero(Wf.reshape(1, -1), scale, zero, fmt.qmax, p=cfg.lp_norm, beta=cfg.beta,
                             kappa=cfg.kappa, iters=cfg.iters, early_stop=cfg.early_stop,
                             integer_zero=not fmt.float_zero_point)
        z_new = z.reshape(1, 1)
    else:
        for c0, width, g0 in _split_groups(fmt, n):
            gw = width if fmt.group_size is None else min(width, fmt.group_size)
            ng = width // gw
            G = Wf[:, c0:c0 + width].reshape(out * ng, gw)
            s = scale[:, g0:g0 + ng].reshape(-1, 1)
            z0 = zero[:, g0:g0 + ng].reshape(-1, 1)
            z, _ = optimize_zero(G, s, z0, fmt.qmax, p=cfg.lp_norm, beta=cfg.beta, kappa=cfg.kappa,
                                 iters=cfg.iters, early_stop=cfg.early_stop,
                                 integer_zero=not fmt.float_zero_point)
            z_new[:, g0:g0 + ng] = z.reshape(out, ng)
    if fmt.float_zero_point:
        return {"scale": p["scale"], "zero_point": z_new.to(fmt.scale_dtype)}
    return {"scale": p["scale"], "zero_point": z_new.round().clamp(0, fmt.qmax).to(torch.uint8)}


@dataclass(frozen=True)
class HQQConfig(MethodConfig):
    """HQQ with the reference's defaults.

    Attributes:
        format: an asymmetric ``IntAffine`` (any grouping); a float zero point (the reference's storage)
            keeps the solver's result exactly; with an integer one, each group keeps the best rounded zero
            point the solver visits, never worse than the min/max start (see ``core``).
        lp_norm: ``p`` of the ``l_p`` error (< 1 promotes sparse errors).
        beta: initial half-quadratic penalty ``β``.
        kappa: ``β`` growth per step.
        iters: maximum steps.
        early_stop: stop when the mean absolute error stops falling (keep the best zero point).
    """

    kind: ClassVar[str] = "hqq"
    summary: ClassVar[str] = "HQQ: half-quadratic zero-point optimization with an lp<1 error (calibration-free)"
    paper: ClassVar[str] = "https://mobiusml.github.io/hqq_blog/"

    format: IntAffine = IntAffine(bits=4, group_size=64, float_zero_point=True)
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    early_stop: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.format, IntAffine):
            raise TypeError(f"HQQ optimizes an IntAffine grid, got format {type(self.format).__name__}")
        if self.format.symmetric:
            raise ValueError("HQQ optimizes the zero point: use an asymmetric IntAffine (symmetric=False)")
        if not 0 < self.lp_norm <= 1:
            raise ValueError(f"lp_norm must be in (0, 1], got {self.lp_norm!r}")
        if not self.beta > 0 or not self.kappa >= 1:
            raise ValueError(f"beta must be > 0 and kappa >= 1, got beta={self.beta!r}, kappa={self.kappa!r}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"iters must be a non-negative int, got {self.iters!r}")

    def quantize_weight(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor] | None = None) -> QuantizedTensor:
        """Quantize ``W: (out, in)`` with HQQ-optimized zero points; ``stats`` is ignored."""
        check_weight(W)
        return self.format.quantize(W, **hqq_params(W, self.format, self))

    @classmethod
    def for_bits(cls, bits: int, group_size: int | None = None, **options: Any) -> "HQQConfig":
        """``IntAffine(bits, group_size or 64, float_zero_point=True)``; ``options`` go to ``HQQConfig``."""
        cls.check_bits(bits)
        return cls(format=IntAffine(bits=bits, group_size=group_size or 64, float_zero_point=True), **options)
