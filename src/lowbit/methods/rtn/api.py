"""``RTNConfig``: round-to-nearest into any lowbit format (no calibration)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from lowbit.formats.affine import IntAffine
from lowbit.formats.base import Format, QuantizedTensor, check_weight
from lowbit.methods.base import MethodConfig
from lowbit.methods.rtn.core import rtn

__all__ = ["RTNConfig"]


@dataclass(frozen=True)
class RTNConfig(MethodConfig):
    """Round-to-nearest.

    Attributes:
        format: any lowbit format, e.g. ``IntAffine(bits=4, group_size=128)`` (the default).
    """

    kind: ClassVar[str] = "rtn"
    summary: ClassVar[str] = "round-to-nearest into any format (calibration-free baseline)"
    paper: ClassVar[str] = "arXiv:2210.17323 (baseline)"

    format: Format = IntAffine(bits=4, group_size=128)

    def __post_init__(self) -> None:
        if not isinstance(self.format, Format):
            raise TypeError(f"RTNConfig.format must be a lowbit Format, got {type(self.format).__name__}")

    def quantize_weight(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor] | None = None) -> QuantizedTensor:
        """Quantize ``W: (out, in)``; ``stats`` is ignored (RTN needs none)."""
        check_weight(W)
        return rtn(W, self.format)

    @classmethod
    def for_bits(cls, bits: int, group_size: int | None = None, **options: Any) -> "RTNConfig":
        """Asymmetric ``IntAffine(bits, group_size or 128)``; ``options`` go to ``IntAffine``."""
        cls.check_bits(bits)
        return cls(format=IntAffine(bits=bits, group_size=group_size or 128, **options))
