"""``LLMInt8Config``: LLM.int8() (arXiv 2208.07339) as a lowbit method.

Weights: int8 absmax per output row (:class:`~lowbit.formats.int8_rowwise.Int8Rowwise`). At inference the
format quantizes each token's input row to int8 and runs the input columns holding any ``|x| ≥ threshold``
in float (the mixed-precision decomposition). Calibration-free. A model quantized this way is a frozen base
for LoRA: ``lowbit::qlinear``'s backward passes gradients to the input (see :mod:`lowbit.nn.lora`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from lowbit.config import ConfigError
from lowbit.formats.act_quant import ActQuant
from lowbit.formats.base import QuantizedTensor
from lowbit.formats.int8_rowwise import Int8Rowwise
from lowbit.methods.base import MethodConfig

__all__ = ["LLMInt8Config"]


@dataclass(frozen=True)
class LLMInt8Config(MethodConfig):
    """LLM.int8(): ``format=Int8Rowwise(act=ActQuant('int8', 'token'), threshold=6.0)``.

    Use :meth:`for_bits` (or pass a threshold) rather than building the format by hand; ``threshold=0``
    gives plain vector-wise W8A8 without outlier columns.
    """

    kind: ClassVar[str] = "llm_int8"
    bits_choices: ClassVar[tuple[int, ...]] = (8,)
    summary: ClassVar[str] = "LLM.int8(): vector-wise int8 W8A8 with float outlier input columns (|x| >= 6)"
    paper: ClassVar[str] = "arXiv:2208.07339"

    format: Int8Rowwise = Int8Rowwise(act=ActQuant("int8", "token"), threshold=6.0)

    def __post_init__(self) -> None:
        f = self.format
        if not isinstance(f, Int8Rowwise) or f.granularity != "channel" or f.act is None or \
                f.act.dtype != "int8" or f.act.granularity != "token":
            raise ConfigError("llm_int8 needs format=Int8Rowwise(granularity='channel', act=ActQuant('int8', 'token'), "
                              f"threshold=...); got {f!r}")

    def quantize_weight(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor] | None = None) -> QuantizedTensor:
        return self.format.quantize(W)

    @classmethod
    def for_bits(cls, bits: int, group_size: int | None = None, **options: Any) -> "LLMInt8Config":
        """LLM.int8() at 8 bits; ``threshold`` (default 6.0) may be passed as an option."""
        cls.check_bits(bits)
        if group_size is not None:
            raise ConfigError(f"llm_int8 is vector-wise (one scale per row); group_size={group_size} is not supported")
        threshold = float(options.pop("threshold", 6.0))
        if options:
            raise ConfigError(f"unknown llm_int8 option(s) {sorted(options)}; valid: threshold")
        return cls(format=Int8Rowwise(act=ActQuant("int8", "token"), threshold=threshold))

    def describe(self) -> str:
        t = self.format.threshold
        return f"llm_int8(W8A8 int8/token, {f'outliers |x|>={t:g} in float' if t > 0 else 'no outlier columns'})"
