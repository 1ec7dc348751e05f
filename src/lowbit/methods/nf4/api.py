"""``NF4Config`` / ``FP4Config``: QLoRA's 4-bit weight storage (calibration-free), bitsandbytes-compatible."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from lowbit.formats.base import QuantizedTensor, check_weight
from lowbit.formats.codebook import Codebook
from lowbit.methods.base import MethodConfig

__all__ = ["NF4Config", "FP4Config"]


@dataclass(frozen=True)
class NF4Config(MethodConfig):
    """NF4 with block-wise absmax (block 64) and double quantization, as QLoRA stores its base model.

    Attributes:
        format: a ``Codebook`` whose ``name`` is ``"nf4"``.
    """

    kind: ClassVar[str] = "nf4"
    code_name: ClassVar[str] = "nf4"
    bits_choices: ClassVar[tuple[int, ...]] = (4,)
    summary: ClassVar[str] = "QLoRA NF4: 4-bit NormalFloat, block-wise absmax, double quantization"
    paper: ClassVar[str] = "arXiv:2305.14314"

    format: Codebook = Codebook("nf4", 64, True)

    def __post_init__(self) -> None:
        if not isinstance(self.format, Codebook) or self.format.name != self.code_name:
            raise ValueError(f"{self.kind} needs format=Codebook(name={self.code_name!r}, ...), got {self.format!r}")

    def quantize_weight(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor] | None = None) -> QuantizedTensor:
        """Quantize ``W: (out, in)`` (no statistics used)."""
        check_weight(W)
        return self.format.quantize(W)

    @classmethod
    def for_bits(cls, bits: int, group_size: int | None = None, **options: Any) -> "NF4Config":
        """4 bits only; ``group_size`` is the absmax block (default 64); ``options`` go to ``Codebook``."""
        cls.check_bits(bits)
        return cls(format=Codebook(cls.code_name, block_size=group_size or 64, **options))


@dataclass(frozen=True)
class FP4Config(NF4Config):
    """bitsandbytes' FP4 (E2M1, bias 2) with block-wise absmax and double quantization."""

    kind: ClassVar[str] = "fp4"
    code_name: ClassVar[str] = "fp4"
    summary: ClassVar[str] = "bitsandbytes FP4 (E2M1): block-wise absmax, double quantization"

    format: Codebook = Codebook("fp4", 64, True)
