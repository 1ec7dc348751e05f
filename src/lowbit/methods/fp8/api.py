"""``FP8Config``: FP8 weights (E4M3 by default, any ExMy) and FP8 activations (W8A8), calibration-free.

Weights get one scale per output channel, from absmax or from the MSE max-value search (the paper's exponent
bias search), and are rounded to nearest or, with ``gptq=True``, by GPTQ on the FP8 grid (as llm-compressor's
FP8 schemes with its GPTQ modifier; needs calibration); activations one dynamic scale per token (or per tensor). E4M3/E5M2 matmuls run through
``torch._scaled_mm`` where the build has it, else the reference (fake-quantized activations × dequantized
weights); both agree (tests/methods/test_fp8.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from lowbit.config import ConfigError
from lowbit.formats.act_quant import ActQuant
from lowbit.formats.base import QuantizedTensor
from lowbit.formats.minifloat import PRESETS, Minifloat
from lowbit.methods.base import MethodConfig

__all__ = ["FP8Config"]

FP8_NAMES = ("e5m2", "e4m3", "e3m4", "e2m5")


@dataclass(frozen=True)
class FP8Config(MethodConfig):
    """FP8 W8A8: ``format=Minifloat.preset('e4m3', act=ActQuant('e4m3', 'token'))``.

    Attributes:
        format: a :class:`Minifloat` with 8 bits in total; ``act`` None for weight-only FP8.
        gptq: round the weights with GPTQ on the format's grid (scales fixed first, from absmax or the search)
            instead of to nearest; needs the ``hessian`` statistic (calibration).
        damp: GPTQ dampening (fraction of mean(diag H)).
    """

    kind: ClassVar[str] = "fp8"
    bits_choices: ClassVar[tuple[int, ...]] = (8,)
    summary: ClassVar[str] = ("FP8 W8A8 (E4M3 default; E5M2/E3M4/E2M5), per-channel scales (opt. MSE max-value search; "
                              "opt. GPTQ rounding), per-token activations")
    paper: ClassVar[str] = "arXiv:2208.09225"
    option_stats: ClassVar[Mapping[str, tuple[str, ...]]] = {"--gptq": ("hessian",)}

    format: Minifloat = Minifloat.preset("e4m3", act=ActQuant("e4m3", "token"))
    gptq: bool = False
    damp: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.format, Minifloat) or self.format.bits != 8:
            raise ConfigError(f"fp8 needs an 8-bit Minifloat format (E+M = 7), got {self.format!r}")
        if not (isinstance(self.damp, (int, float)) and self.damp > 0):
            raise ConfigError(f"damp must be a positive fraction of mean(diag H), got {self.damp!r} (reference: 0.01)")
        if self.gptq:  # this instance needs calibration (the class default is calibration-free)
            object.__setattr__(self, "stats", ("hessian",))

    def quantize_weight(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor] | None = None) -> QuantizedTensor:
        if not self.gptq:
            return self.format.quantize(W)
        from lowbit.methods.gptq.api import quantize_with_hessian, require_hessian

        H = require_hessian(stats, W, self.kind)
        return quantize_with_hessian(self.format, W, H, damp=self.damp, block_size=128, act_order=False,
                                     static_groups=False)

    @classmethod
    def for_bits(cls, bits: int, group_size: int | None = None, **options: Any) -> "FP8Config":
        """FP8 at 8 bits. Options: ``dtype`` (weights, default ``"e4m3"``), ``act_dtype`` (default: same as
        ``dtype`` for E4M3/E5M2, else ``"e4m3"``; ``None`` for weight-only), ``act_granularity`` (``"token"``),
        ``scale_search`` (default False: absmax scales; True: the MSE max-value search), ``gptq`` (default False:
        round to nearest; True: GPTQ, needs calibration)."""
        cls.check_bits(bits)
        dtype = str(options.pop("dtype", "e4m3")).lower()
        if dtype not in FP8_NAMES:
            raise ConfigError(f"fp8 dtype={dtype!r} unknown; valid choices: {list(FP8_NAMES)}")
        act_dtype = options.pop("act_dtype", dtype if dtype in ("e4m3", "e5m2") else "e4m3")
        act_gran = options.pop("act_granularity", "token")
        search = bool(options.pop("scale_search", False))
        gptq = bool(options.pop("gptq", False))
        if options:
            raise ConfigError(f"unknown fp8 option(s) {sorted(options)}; valid: dtype, act_dtype, act_granularity, "
                              "scale_search, gptq")
        gran = "channel" if group_size is None else "group"
        act = None if act_dtype is None else ActQuant(str(act_dtype), act_gran)
        assert dtype in PRESETS
        return cls(format=Minifloat.preset(dtype, granularity=gran, group_size=group_size, scale_search=search,
                                           act=act), gptq=gptq)

    def describe(self) -> str:
        f = self.format
        a = "A16" if f.act is None else f"A8:{f.act.dtype}/{f.act.granularity}"
        search = ", max-value search" if f.scale_search else ""
        rounding = ", gptq" if self.gptq else ""
        return f"fp8(W:E{f.exponent_bits}M{f.mantissa_bits}/{f.granularity}{search}{rounding}, {a})"
