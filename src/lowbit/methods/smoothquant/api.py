"""``SmoothQuantConfig``: SmoothQuant (arXiv 2211.10438) smoothing + W8A8 int8, levels O1-O3.

Per decoder block (through :mod:`lowbit.calibration.sequential`'s ``prepare_block`` hook): for each
norm → Linear pair of :mod:`lowbit.model.mappings` (the reference smooths only those: input_layernorm →
q/k/v, post_attention_layernorm → gate/up), compute ``s`` from the inputs' ``act_absmax`` and the weights,
fold ``1/s`` into the norm and ``s`` into the Linears; then store every target Linear as int8:

====  ========================  ==============================================
O1    per-channel weights       per-token dynamic int8 activations
O2    per-tensor weights        per-tensor dynamic int8 activations
O3    per-tensor weights        per-tensor static int8 activations (calibrated)
====  ========================  ==============================================

(O1 uses per-channel weights as the reference's Llama path does; the paper's Table 2 has per-tensor.)
Matmuls run int8 × int8 → int32 (``torch._int_mm`` where available) in :class:`~lowbit.formats.int8_rowwise.Int8Rowwise`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from lowbit.config import ConfigError
from lowbit.formats.act_quant import ActQuant
from lowbit.formats.base import QuantizedTensor
from lowbit.formats.int8_rowwise import Int8Rowwise
from lowbit.methods.base import MethodConfig
from lowbit.methods.smoothquant.core import smoothing_factors
from lowbit.model.mappings import fold_scale, resolve

__all__ = ["SmoothQuantConfig", "LEVELS", "smooth_block"]

log = logging.getLogger(__name__)

LEVELS: dict[str, Int8Rowwise] = {
    "O1": Int8Rowwise(granularity="channel", act=ActQuant("int8", "token")),
    "O2": Int8Rowwise(granularity="tensor", act=ActQuant("int8", "tensor")),
    "O3": Int8Rowwise(granularity="tensor", act=ActQuant("int8", "tensor", static=True)),
}


def smooth_block(block: nn.Module, act_absmax: Mapping[str, torch.Tensor], alpha: float,
                 only: set[str] | None = None) -> list[str]:
    """Smooth every norm → Linear pair of ``block`` in place; returns the smoothed norms' names.

    Args:
        block: a decoder block with a row in :data:`lowbit.model.mappings.MAPPINGS`.
        act_absmax: per-layer ``max|X_j|`` keyed by names relative to the block.
        alpha: migration strength.
        only: the layers being quantized (pairs with other balance layers are skipped).
    """
    done = []
    for m in resolve(block, only=only):
        if m.smooth_is_linear or m.balance_names[0] not in act_absmax:
            continue
        amax = torch.stack([act_absmax[n] for n in m.balance_names if n in act_absmax]).amax(dim=0)
        s = smoothing_factors(amax, [fc.weight for fc in m.balance], alpha)
        fold_scale(m.smooth, m.balance, s.to(m.balance[0].weight.device))
        done.append(m.smooth_name)
    return done


@dataclass(frozen=True)
class SmoothQuantConfig(MethodConfig):
    """SmoothQuant W8A8.

    Attributes:
        format: an :class:`Int8Rowwise` with int8 activations (see :data:`LEVELS`; default O1).
        alpha: migration strength (paper default 0.5; Llama 0.8-0.85).
        smooth: False gives naive W8A8 (same format, no smoothing), the baseline SmoothQuant beats.
    """

    kind: ClassVar[str] = "smoothquant"
    stats: ClassVar[tuple[str, ...]] = ("act_absmax",)
    bits_choices: ClassVar[tuple[int, ...]] = (8,)
    summary: ClassVar[str] = "SmoothQuant: fold activation outliers into weights (s=max|X|^a/max|W|^(1-a)), W8A8 int8 O1-O3"
    paper: ClassVar[str] = "arXiv:2211.10438"

    format: Int8Rowwise = LEVELS["O1"]
    alpha: float = 0.5
    smooth: bool = True

    def __post_init__(self) -> None:
        f = self.format
        if not isinstance(f, Int8Rowwise) or f.act is None or f.act.dtype != "int8":
            raise ConfigError(f"smoothquant needs an Int8Rowwise format with int8 activations (see LEVELS), got {f!r}")
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha={self.alpha!r} out of range; valid: 0 <= alpha <= 1")

    def prepare_block(self, block: nn.Module, calls: Any, stats_by_layer: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Runner hook: smooth the block's norm → Linear pairs with the collected ``act_absmax``."""
        if not self.smooth:
            return
        amax = {n: st["act_absmax"] for n, st in stats_by_layer.items() if "act_absmax" in st}
        done = smooth_block(block, amax, self.alpha, only=set(stats_by_layer))
        log.debug("smoothquant: smoothed %s", done)

    def quantize_weight(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor] | None = None) -> QuantizedTensor:
        assert self.format.act is not None
        if self.format.act.static:
            amax = (stats or {}).get("act_absmax")
            if amax is None:
                raise ValueError("smoothquant O3 (static activations) needs the 'act_absmax' statistic")
            return self.format.quantize(W, act_scale=self.format.act.scale_from_absmax(amax))
        return self.format.quantize(W)

    @classmethod
    def for_bits(cls, bits: int, group_size: int | None = None, **options: Any) -> "SmoothQuantConfig":
        """W8A8 at 8 bits. Options: ``level`` (``"O1"``, ``"O2"``, ``"O3"``), ``alpha`` (0.5), ``smooth`` (True)."""
        cls.check_bits(bits)
        if group_size is not None:
            raise ConfigError(f"smoothquant stores per-channel or per-tensor int8; group_size={group_size} is not supported")
        level = str(options.pop("level", "O1")).upper()
        if level not in LEVELS:
            raise ConfigError(f"smoothquant level={level!r} unknown; valid choices: {sorted(LEVELS)}")
        alpha = float(options.pop("alpha", 0.5))
        smooth = bool(options.pop("smooth", True))
        if options:
            raise ConfigError(f"unknown smoothquant option(s) {sorted(options)}; valid: level, alpha, smooth")
        return cls(format=LEVELS[level], alpha=alpha, smooth=smooth)

    def describe(self) -> str:
        f = self.format
        assert f.act is not None
        lvl = next((k for k, v in LEVELS.items() if v == f), "custom")
        return (f"smoothquant({lvl}: W8/{f.granularity} {f.act.describe()}, alpha={self.alpha:g}"
                f"{'' if self.smooth else ', no smoothing'})")
