"""``QALoRAConfig``: QA-LoRA (arXiv 2309.14717) — LoRA over group-pooled inputs of an IntAffine base,
merged exactly into float zero points.

``apply_qa_lora(model, QALoRAConfig.for_bits(4, 32))`` quantizes every Linear with ``IntAffine`` (float zero
points, fp32 scales so the merge is exact) — or keeps existing IntAffine ``QuantLinear`` layers (e.g. from
GPTQ), converting their integer zero points to floats losslessly — and wraps each in a
:class:`QALoRALinear`. After training, :func:`merge_qa_lora` folds every adapter into its layer's zero points:
the merged model is int codes + scales + float zero points, with no LoRA branch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from lowbit.config import ConfigError
from lowbit.formats.affine import IntAffine
from lowbit.formats.base import QuantizedTensor
from lowbit.methods.base import MethodConfig
from lowbit.methods.qa_lora.core import expand_groups, group_delta, group_sizes, merge_zero_point, pool
from lowbit.nn.linear import QuantLinear
from lowbit.nn.lora import LoRALinear, LoRASpec

__all__ = ["QALoRAConfig", "QALoRALinear", "apply_qa_lora", "merge_qa_lora", "with_float_zero_point"]

log = logging.getLogger(__name__)


def with_float_zero_point(q: QuantizedTensor) -> QuantizedTensor:
    """The same weight with fp32 scales and float zero points (lossless: codes untouched, values exact)."""
    fmt = q.format
    if not isinstance(fmt, IntAffine):
        raise TypeError(f"QA-LoRA needs an IntAffine base, got format {fmt.kind!r}")
    if fmt.act_order or fmt.per_tensor:
        raise ValueError("QA-LoRA needs contiguous input groups: act_order (g_idx) and per_tensor bases cannot "
                         "absorb a group-constant update into one zero point; requantize without them")
    if fmt.float_zero_point and fmt.scale_dtype == torch.float32:
        return q
    scale = q["scale"].float()
    if fmt.symmetric:
        zero = torch.full_like(scale, float(1 << (fmt.bits - 1)))
    else:
        zero = q["zero_point"].float()
    new = fmt.replace(symmetric=False, float_zero_point=True, scale_dtype=torch.float32)
    return QuantizedTensor(new, q.shape, q.dtype, {"qdata": q["qdata"], "scale": scale, "zero_point": zero})


class QALoRALinear(LoRALinear):
    """LoRA whose ``lora_A`` reads the input averaged over the base's quantization groups.

    ``lora_A: (r, n_groups)``; the base must be an IntAffine ``QuantLinear`` with float zero points.
    """

    def __init__(self, base_layer: QuantLinear, spec: LoRASpec) -> None:
        if not isinstance(base_layer, QuantLinear) or not isinstance(base_layer.format, IntAffine):
            raise TypeError(f"QALoRALinear wraps an IntAffine QuantLinear, got {type(base_layer).__name__}")
        self.group_size: int | None = base_layer.format.group_size
        sizes = group_sizes(base_layer.in_features, self.group_size)
        super().__init__(base_layer, spec, adapter_in_features=sizes.numel())
        self.register_buffer("group_sizes", sizes, persistent=False)

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        return pool(x, self.group_size)

    def group_delta(self) -> torch.Tensor:
        """``D``: ``(out_features, n_groups)`` fp32, the update of each column of each group."""
        return group_delta(self.lora_A.weight.float(), self.lora_B.weight.float(), self.scaling, self.group_sizes)

    def delta_weight(self) -> torch.Tensor:
        return expand_groups(self.group_delta(), self.group_sizes)

    def merged_quant_linear(self, round_zero_points: bool = False) -> QuantLinear:
        """The base with ``z' = z − D/s``: same codes and scales, new float zero points.

        ``round_zero_points=True`` rounds ``z'`` to integers — the control that shows why they must stay floats.
        """
        base = self.base_layer
        assert isinstance(base, QuantLinear)
        q = with_float_zero_point(base.qweight)
        z = merge_zero_point(q["zero_point"].float(), q["scale"].float(), self.group_delta().detach())
        if round_zero_points:
            z = z.round()
        data = dict(q.data)
        data["zero_point"] = z.to(q["zero_point"].dtype)
        bias = None if base.bias is None else base.bias.detach()
        return QuantLinear(QuantizedTensor(q.format, q.shape, q.dtype, data), bias)


@dataclass(frozen=True)
class QALoRAConfig(MethodConfig):
    """QA-LoRA settings.

    Attributes:
        format: ``IntAffine`` base; its ``group_size`` is the pooling group (the paper's L). Float zero points
            and fp32 scales keep the merge exact (fp16 zero points cost a few % of the update).
        rank, alpha, dropout: LoRA settings (paper: r=64, alpha=16, dropout 0).
    """

    kind: ClassVar[str] = "qa_lora"
    bits_choices: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 7, 8)
    summary: ClassVar[str] = "QA-LoRA: LoRA over group-pooled inputs, merged exactly into float zero points"
    paper: ClassVar[str] = "arXiv:2309.14717"

    format: IntAffine
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.format, IntAffine):
            raise TypeError(f"QALoRAConfig.format must be IntAffine, got {type(self.format).__name__}")
        if self.format.act_order or self.format.per_tensor:
            raise ConfigError("QA-LoRA's format needs contiguous groups (act_order=False, per_tensor=False)")
        LoRASpec(r=self.rank, alpha=self.alpha, dropout=self.dropout)  # validates

    @property
    def spec(self) -> LoRASpec:
        return LoRASpec(r=self.rank, alpha=self.alpha, dropout=self.dropout)

    def quantize_weight(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor] | None = None) -> QuantizedTensor:
        """The base (RTN into :attr:`format`); adapters come from :func:`apply_qa_lora`."""
        return with_float_zero_point(self.format.quantize(W))

    @classmethod
    def for_bits(cls, bits: int, group_size: int | None = 32, **options: Any) -> "QALoRAConfig":
        """IntAffine(bits, group_size (default 32, the paper's), float zero points, fp32 scales)."""
        cls.check_bits(bits)
        gs = 32 if group_size is None else group_size
        return cls(format=IntAffine(bits=bits, group_size=gs, float_zero_point=True, scale_dtype=torch.float32),
                   **options)


def apply_qa_lora(model: nn.Module, config: QALoRAConfig, *, targets: Sequence[str] = ("Linear",),
                  ignore: Sequence[str] = ()) -> list[str]:
    """Quantize (float Linear) or adopt (IntAffine QuantLinear) every selected layer and add QA-LoRA, in place."""
    from lowbit.nn.lora import add_lora

    def make(name: str, layer: nn.Module, spec: LoRASpec) -> LoRALinear:
        if isinstance(layer, nn.Linear):
            q = config.quantize_weight(layer.weight.detach())
            bias = None if layer.bias is None else layer.bias.detach()
            base = QuantLinear(q, bias)
        elif isinstance(layer, QuantLinear):
            base = QuantLinear(with_float_zero_point(layer.qweight), None if layer.bias is None else layer.bias.detach())
        else:  # pragma: no cover - add_lora only passes linear layers
            raise TypeError(f"{name}: cannot apply QA-LoRA to {type(layer).__name__}")
        return QALoRALinear(base, spec)

    return add_lora(model, config.spec, targets=targets, ignore=ignore, factory=make)


def merge_qa_lora(model: nn.Module, *, round_zero_points: bool = False) -> list[str]:
    """Fold every :class:`QALoRALinear` into its base's zero points, in place (no LoRA branch remains)."""
    from lowbit.model.walk import set_submodule

    names = [n for n, m in model.named_modules() if isinstance(m, QALoRALinear)]
    for n in names:
        set_submodule(model, n, model.get_submodule(n).merged_quant_linear(round_zero_points))
    return names
