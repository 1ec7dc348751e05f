"""``SpQRConfig``: SpQR (arXiv 2306.03078) through the GPTQ sweep, stored as ``Outliers(base=BilevelAffine(...))``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from lowbit.config import ConfigError
from lowbit.formats.base import Format, QuantizedTensor
from lowbit.formats.bilevel import BilevelAffine
from lowbit.formats.outliers import Outliers
from lowbit.methods.base import MethodConfig
from lowbit.methods.gptq.api import affine_column_rounder, require_hessian
from lowbit.methods.gptq.core import gptq
from lowbit.methods.spqr.core import leave_one_out_reduction, outlier_threshold, without_likely_outliers

__all__ = ["SpQRConfig"]


@dataclass(frozen=True)
class SpQRConfig(MethodConfig):
    """SpQR with the reference's options.

    Attributes:
        format: ``Outliers(base=BilevelAffine(bits, group_size=16, stat_bits=3, stat_group_size=16))``.
        outlier_threshold: τ relative to ``mean_j(Var W_:j / U_jj²)`` (reference ``--outlier_threshold 0.2``);
            ``inf`` disables outliers.
        damp: dampening as a fraction of ``mean(diag H)`` (reference code default 0.01; its README's
            near-lossless recipe uses 1.0).
        block_size: GPTQ lazy-batch width.
        simplified_outliers: skip the leave-one-out pass when fitting group statistics.
    """

    kind: ClassVar[str] = "spqr"
    stats: ClassVar[tuple[str, ...]] = ("hessian",)
    summary: ClassVar[str] = "SpQR: GPTQ with 16-wide bilevel groups and sparse fp16 outliers"
    paper: ClassVar[str] = "arXiv:2306.03078"

    format: Format = dataclasses.field(default_factory=lambda: Outliers(base=BilevelAffine(bits=3)))
    outlier_threshold: float = 0.2
    damp: float = 0.01
    block_size: int = 128
    simplified_outliers: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.format, Outliers) and isinstance(self.format.base, BilevelAffine)):
            raise TypeError("SpQRConfig.format must be Outliers(base=BilevelAffine(...)), got "
                            f"{self.format!r}")
        if not (isinstance(self.outlier_threshold, (int, float)) and self.outlier_threshold > 0):
            raise ConfigError(f"outlier_threshold must be > 0 (math.inf disables outliers), got {self.outlier_threshold!r}")
        if not (isinstance(self.damp, (int, float)) and self.damp > 0):
            raise ConfigError(f"damp must be a positive fraction of mean(diag H), got {self.damp!r}")
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ConfigError(f"block_size must be a positive int, got {self.block_size!r}")

    def quantize_weight(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor] | None = None) -> QuantizedTensor:
        H = require_hessian(stats, W, self.kind)
        fmt: Outliers = self.format  # type: ignore[assignment]
        base: BilevelAffine = fmt.base  # type: ignore[assignment]
        out, n = W.shape
        mask = torch.zeros(out, n, dtype=torch.bool, device=W.device)
        tau = [math.inf]

        def on_factor(Wp: torch.Tensor, U: torch.Tensor) -> None:
            if math.isfinite(self.outlier_threshold):
                tau[0] = outlier_threshold(Wp, U, self.outlier_threshold)

        def fit(Wg: torch.Tensor, u: torch.Tensor | None) -> dict[str, torch.Tensor]:
            if u is not None and not self.simplified_outliers and math.isfinite(tau[0]):
                Wg = without_likely_outliers(Wg, leave_one_out_reduction(Wg, u, base.bits) > tau[0])
            return base.params(Wg)

        # the arithmetic of base.fake_quantize on one column, the group's statistics dequantized once
        rnd = affine_column_rounder(float((1 << base.bits) - 1), lambda p: base.stats(p, out))

        def round_(w: torch.Tensor, p: dict[str, torch.Tensor], j: int, u_jj: torch.Tensor) -> torch.Tensor:
            q = rnd(w, p)
            out_j = ((w - q) / u_jj).square() > tau[0]
            if bool(out_j.any()):
                mask[:, j:j + 1] = out_j
                q = torch.where(out_j, w.to(fmt.value_dtype).to(w.dtype), q)
            return q

        Q, groups, _, _ = gptq(W.detach(), H.to(W.device), fit, round_, group_size=base.group_size,
                               damp=self.damp, block_size=self.block_size, on_factor=on_factor)
        params = {k: torch.cat([g[k] for g in groups], dim=1) for k in groups[0]}
        q = fmt.quantize(Q, outlier_mask=mask, **params)
        return q if q.dtype == W.dtype else dataclasses.replace(q, dtype=W.dtype)

    @classmethod
    def for_bits(cls, bits: int, group_size: int | None = 16, **options: Any) -> "SpQRConfig":
        """SpQR at ``bits`` with β₂ = ``group_size`` (16), 3-bit statistics in groups of 16 rows."""
        cls.check_bits(bits)
        stat_bits = int(options.pop("stat_bits", 3))
        stat_group_size = int(options.pop("stat_group_size", 16))
        base = BilevelAffine(bits=bits, group_size=group_size or 16, stat_bits=stat_bits,
                             stat_group_size=stat_group_size)
        return cls(format=Outliers(base=base), **options)
