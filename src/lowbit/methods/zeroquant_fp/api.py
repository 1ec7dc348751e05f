"""``ZeroQuantFPConfig``: W4A8 with FP4 (E2M1) weights rounded by GPTQ, FP8 (E4M3) activations, power-of-two
scales and LoRC (arXiv 2307.09782).

* Weights: :class:`~lowbit.formats.minifloat.Minifloat` E2M1 with a scale per group, rounded by GPTQ through the
  format (``gptq=True``, the paper's choice) or by round-to-nearest.
* Scales constrained to powers of two so that FP4 → FP8 is an exponent shift (``pow2_scale``): ``"ceil"``
  (every scale a power of two, M1) or ``"row"`` (a real per-row scale times power-of-two group factors, M2;
  RTN only: GPTQ fits one group at a time and cannot see the row).
* Activations: FP8 E4M3, one dynamic scale per token.
* LoRC: the rank-``r`` SVD of the weight error, stored in fp16 beside the codes and counted in
  ``bits_per_weight``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from lowbit.config import ConfigError
from lowbit.formats.act_quant import ActQuant
from lowbit.formats.base import QuantizedTensor
from lowbit.formats.minifloat import Minifloat
from lowbit.methods.base import MethodConfig
from lowbit.methods.zeroquant_fp.core import lorc

__all__ = ["ZeroQuantFPConfig"]


@dataclass(frozen=True)
class ZeroQuantFPConfig(MethodConfig):
    """ZeroQuant-FP W4A8.

    Attributes:
        format: a Minifloat (default FP4 E2M1, group 128, power-of-two scales, E4M3 per-token activations,
            LoRC rank 8); its ``lorc_rank`` is LoRC's rank (0 turns LoRC off).
        gptq: round with GPTQ (needs the ``hessian`` statistic, collected by the calibration runner).
        damp: GPTQ dampening.
    """

    kind: ClassVar[str] = "zeroquant_fp"
    stats: ClassVar[tuple[str, ...]] = ("hessian",)
    bits_choices: ClassVar[tuple[int, ...]] = (4,)
    summary: ClassVar[str] = "ZeroQuant-FP: W4A8, FP4 E2M1 weights (GPTQ) + FP8 E4M3 activations, pow2 scales, LoRC"
    paper: ClassVar[str] = "arXiv:2307.09782"

    format: Minifloat = Minifloat.preset("e2m1", granularity="group", group_size=128, pow2_scale="ceil",
                                         lorc_rank=8, act=ActQuant("e4m3", "token"))
    gptq: bool = True
    damp: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.format, Minifloat):
            raise ConfigError(f"zeroquant_fp needs a Minifloat format, got {type(self.format).__name__}")
        if self.gptq and self.format.pow2_scale == "row":
            raise ConfigError("pow2_scale='row' (M2) needs the whole row when fitting scales; GPTQ fits one group "
                              "at a time: use pow2_scale='ceil' (M1) with gptq=True, or gptq=False")

    def quantize_weight(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor] | None = None) -> QuantizedTensor:
        base = dataclasses.replace(self.format, lorc_rank=0, act=None)
        if self.gptq:
            from lowbit.methods.gptq.api import quantize_with_hessian, require_hessian

            H = require_hessian(stats, W, self.kind)
            q0 = quantize_with_hessian(base, W, H, damp=self.damp, block_size=128, act_order=False,
                                       static_groups=False)
        else:
            q0 = base.quantize(W)
        W_hat = q0.dequantize().to(torch.float32)
        params: dict[str, torch.Tensor] = {"scale": q0["scale"]}
        if self.format.lorc_rank:
            U, V = lorc(W, W_hat, self.format.lorc_rank)
            params["lora_b"], params["lora_a"] = U, V
        # W_hat lies on the grid of its scales, so storing it again with them keeps GPTQ's codes exactly
        q = self.format.quantize(W_hat, **params)
        return dataclasses.replace(q, dtype=W.dtype)

    @classmethod
    def for_bits(cls, bits: int, group_size: int | None = None, **options: Any) -> "ZeroQuantFPConfig":
        """W4A8 at 4 bits. Options: ``lorc_rank`` (8), ``pow2_scale`` (``"ceil"``), ``gptq`` (True),
        ``act_dtype`` (``"e4m3"``; None for W4A16)."""
        cls.check_bits(bits)
        rank = int(options.pop("lorc_rank", 8))
        pow2 = str(options.pop("pow2_scale", "ceil"))
        gptq = bool(options.pop("gptq", True))
        act_dtype = options.pop("act_dtype", "e4m3")
        if options:
            raise ConfigError(f"unknown zeroquant_fp option(s) {sorted(options)}; valid: lorc_rank, pow2_scale, "
                              "gptq, act_dtype")
        fmt = Minifloat.preset("e2m1", granularity="group", group_size=group_size or 128, pow2_scale=pow2,
                               lorc_rank=rank, act=None if act_dtype is None else ActQuant(str(act_dtype), "token"))
        return cls(format=fmt, gptq=gptq)

    def describe(self) -> str:
        f = self.format
        a = "A16" if f.act is None else f"A8:{f.act.dtype}/{f.act.granularity}"
        return (f"zeroquant_fp(W4:E2M1/g{f.group_size} pow2={f.pow2_scale}, {a}, LoRC r={f.lorc_rank}, "
                f"{'gptq' if self.gptq else 'rtn'})")
