"""``SqueezeLLMConfig``: Fisher-weighted per-row LUTs (+ sparse outliers), arXiv 2306.07629."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from lowbit.config import ConfigError
from lowbit.formats.base import Format, QuantizedTensor
from lowbit.formats.codebook import RowCodebook
from lowbit.formats.outliers import Outliers
from lowbit.methods.base import MethodConfig
from lowbit.methods.squeezellm.core import sparse_mask, weighted_kmeans

__all__ = ["SqueezeLLMConfig"]


@dataclass(frozen=True)
class SqueezeLLMConfig(MethodConfig):
    """SqueezeLLM.

    Attributes:
        format: ``RowCodebook(bits)`` (dense-only) or ``Outliers(base=RowCodebook(bits))`` (dense-and-sparse);
            a ``RowCodebook`` given with non-zero fractions becomes ``Outliers(base=that RowCodebook)``.
        sensitive_fraction: share of weights with the largest Fisher values kept in 16 bits (paper: 0.05 %).
        outlier_fraction: share of range outliers kept in 16 bits (paper: 0.40 %; 0.45 % in total).
        max_iter: Lloyd iterations of the weighted k-means (reference: sklearn ``max_iter=50``).
    """

    kind: ClassVar[str] = "squeezellm"
    stats: ClassVar[tuple[str, ...]] = ("fisher",)
    bits_choices: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 7, 8)
    summary: ClassVar[str] = "SqueezeLLM: Fisher-weighted k-means LUT per row, optional dense-and-sparse outliers"
    paper: ClassVar[str] = "arXiv:2306.07629"

    format: Format = dataclasses.field(default_factory=lambda: RowCodebook(bits=3))
    sensitive_fraction: float = 0.0
    outlier_fraction: float = 0.0
    max_iter: int = 50

    def __post_init__(self) -> None:
        fmt = self.format
        dense = isinstance(fmt, RowCodebook)
        if not (dense or (isinstance(fmt, Outliers) and isinstance(fmt.base, RowCodebook))):
            raise TypeError(f"SqueezeLLMConfig.format must be RowCodebook(bits) or Outliers(base=RowCodebook(bits)), "
                            f"got {fmt!r}")
        for name in ("sensitive_fraction", "outlier_fraction"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v < 0.5:
                raise ConfigError(f"{name} must be a fraction in [0, 0.5), got {v!r} (paper: 0.0005 and 0.004)")
        if dense and (self.sensitive_fraction or self.outlier_fraction):
            # sparse shares asked for on a dense LUT (e.g. ``--outlier-fraction`` on the CLI): store them beside it
            object.__setattr__(self, "format", Outliers(base=fmt))
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise ConfigError(f"max_iter must be a positive int, got {self.max_iter!r}")

    def quantize_weight(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor] | None = None) -> QuantizedTensor:
        F = (stats or {}).get("fisher")
        if F is None:
            raise ValueError(f"method {self.kind!r} needs the 'fisher' statistic; got {sorted(stats or {})} "
                             "(quantize through lowbit.quantize_ with calibration data)")
        if tuple(F.shape) != tuple(W.shape):
            raise ValueError(f"fisher has shape {tuple(F.shape)}, expected the weight's {tuple(W.shape)}")
        fmt = self.format
        base: RowCodebook = fmt.base if isinstance(fmt, Outliers) else fmt  # type: ignore[assignment]
        F = F.to(W.device).float()
        mask = None
        if isinstance(fmt, Outliers):
            mask = sparse_mask(W, F, self.sensitive_fraction, self.outlier_fraction)
            F = F.masked_fill(mask, 0)  # the sparse part is exact: it must not pull the centroids
        C = weighted_kmeans(W.detach(), F, 1 << base.bits, self.max_iter)
        if mask is None:
            return fmt.quantize(W, codebook=C)
        return fmt.quantize(W, codebook=C, outlier_mask=mask)

    @classmethod
    def for_bits(cls, bits: int, group_size: int | None = None, **options: Any) -> "SqueezeLLMConfig":
        """SqueezeLLM at ``bits``; ``sparse=True`` (or explicit fractions) gives the paper's 0.05 % + 0.40 %."""
        cls.check_bits(bits)
        if group_size is not None:
            raise ConfigError("SqueezeLLM uses one LUT per output row, no groups (the paper found grouping worse "
                              f"than sparsity); got group_size={group_size}")
        if options.pop("sparse", False):
            options.setdefault("sensitive_fraction", 0.0005)
            options.setdefault("outlier_fraction", 0.004)
        sparse = options.get("sensitive_fraction", 0) or options.get("outlier_fraction", 0)
        fmt: Format = Outliers(base=RowCodebook(bits)) if sparse else RowCodebook(bits)
        return cls(format=fmt, **options)
