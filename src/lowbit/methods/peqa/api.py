"""``PEQAConfig``: scale-only fine-tuning of an IntAffine-quantized model (arXiv 2305.14152).

``apply_peqa(model, PEQAConfig.for_bits(4))`` quantizes every Linear with IntAffine (per output channel by
default; ``group_size`` for per-group scales) — or adopts existing IntAffine ``QuantLinear`` layers — and
replaces each by a :class:`PEQALinear` whose ``scale`` is the only trainable tensor. :func:`finish_peqa`
turns them back into ``QuantLinear`` layers with the tuned scales: codes and zero points are bit-identical
to the ones before tuning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from lowbit.config import ConfigError
from lowbit.formats.affine import IntAffine, group_index
from lowbit.formats.base import QuantizedTensor
from lowbit.formats.bitpack import unpack
from lowbit.methods.base import MethodConfig
from lowbit.methods.peqa.core import dequantize
from lowbit.nn.linear import QuantLinear

__all__ = ["PEQAConfig", "PEQALinear", "apply_peqa", "finish_peqa", "scale_parameters"]


class PEQALinear(nn.Module):
    """An IntAffine layer whose scales train: ``y = x @ ((W̄ − z₀) ⊙ s)ᵀ + b``.

    Buffers ``qdata`` (packed codes) and ``zero_point`` are frozen; ``scale: (out, n_groups)`` fp32 is an
    ``nn.Parameter``. Codes are unpacked once into an int8/uint8 buffer for speed.
    """

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        fmt = q.format
        if not isinstance(fmt, IntAffine) or fmt.act_order or fmt.per_tensor:
            raise TypeError(f"PEQA needs an IntAffine weight with contiguous groups, got {q.format}")
        self.format = fmt
        self.out_features, self.in_features = q.shape
        self.dtype = q.dtype
        self.register_buffer("qdata", q["qdata"])
        zero = q.get("zero_point")
        if zero is None:
            zero = torch.full_like(q["scale"], float(1 << (fmt.bits - 1)), dtype=torch.float32)
        self.register_buffer("zero_point", zero)
        self.register_buffer("codes", unpack(q["qdata"], fmt.bits, self.in_features).to(torch.uint8), persistent=False)
        self.register_buffer("groups", group_index(self.in_features, fmt.group_size), persistent=False)
        self.scale = nn.Parameter(q["scale"].float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def weight(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero_point, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.weight().to(x.dtype)
        return nn.functional.linear(x, W, None if self.bias is None else self.bias.to(x.dtype))

    def to_quant_linear(self) -> QuantLinear:
        """Back to a ``QuantLinear`` with the tuned scales (stored in fp32; codes and zero points as before)."""
        fmt = self.format.replace(scale_dtype=torch.float32)
        data = {"qdata": self.qdata, "scale": self.scale.detach().float().clone()}
        if not fmt.symmetric:
            zp = self.zero_point
            data["zero_point"] = zp.float() if fmt.float_zero_point else zp
        q = QuantizedTensor(fmt, (self.out_features, self.in_features), self.dtype, data)
        return QuantLinear(q, None if self.bias is None else self.bias.detach())


@dataclass(frozen=True)
class PEQAConfig(MethodConfig):
    """PEQA settings.

    Attributes:
        format: IntAffine base; ``group_size=None`` is per output channel (the paper's default), an int gives
            per-group scales.
    """

    kind: ClassVar[str] = "peqa"
    bits_choices: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 7, 8)
    summary: ClassVar[str] = "PEQA: fine-tune only the scales of an integer-quantized model"
    paper: ClassVar[str] = "arXiv:2305.14152"

    format: IntAffine

    def __post_init__(self) -> None:
        if not isinstance(self.format, IntAffine):
            raise TypeError(f"PEQAConfig.format must be IntAffine, got {type(self.format).__name__}")
        if self.format.act_order or self.format.per_tensor:
            raise ConfigError("PEQA needs per-channel or per-group scales (act_order=False, per_tensor=False)")

    def quantize_weight(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor] | None = None) -> QuantizedTensor:
        """The RTN starting point (tuning happens in :func:`apply_peqa` + training)."""
        return self.format.quantize(W)

    @classmethod
    def for_bits(cls, bits: int, group_size: int | None = None, **options: Any) -> "PEQAConfig":
        """Asymmetric IntAffine(bits), per channel unless ``group_size``; fp32 scales (they are trained)."""
        cls.check_bits(bits)
        return cls(format=IntAffine(bits=bits, group_size=group_size, scale_dtype=torch.float32), **options)


def apply_peqa(model: nn.Module, config: PEQAConfig, *, targets: Sequence[str] = ("Linear",),
               ignore: Sequence[str] = ()) -> list[str]:
    """Quantize (or adopt) the selected layers as :class:`PEQALinear`, freeze everything but their scales."""
    from lowbit.model.walk import set_submodule
    from lowbit.nn.lora import iter_linear

    layers = list(iter_linear(model, targets, ignore))
    if not layers:
        raise ValueError(f"no Linear layer matched targets={list(targets)} ignore={list(ignore)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in layers:
        if isinstance(layer, QuantLinear):
            q, bias = layer.qweight, layer.bias
        else:
            q, bias = config.quantize_weight(layer.weight.detach()), layer.bias
        set_submodule(model, name, PEQALinear(q, None if bias is None else bias.detach()))
    return [n for n, _ in layers]


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable scales of every :class:`PEQALinear`."""
    return [m.scale for m in model.modules() if isinstance(m, PEQALinear)]


def finish_peqa(model: nn.Module) -> list[str]:
    """Replace every :class:`PEQALinear` by a ``QuantLinear`` with its tuned scales, in place."""
    from lowbit.model.walk import set_submodule

    names = [n for n, m in model.named_modules() if isinstance(m, PEQALinear)]
    for n in names:
        set_submodule(model, n, model.get_submodule(n).to_quant_linear())
    return names
