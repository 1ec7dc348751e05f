"""``LoftQConfig``: LoftQ initialization (arXiv 2310.08659) of a quantized base plus LoRA, layer by layer.

``apply_loftq(model, LoftQConfig(format=..., rank=16, alpha=16, iters=5))`` replaces every selected Linear by
a ``LoRALinear`` around a ``QuantLinear`` (the stored ``Q_T``) whose ``lora_A``/``lora_B`` hold LoftQ's
factors, one layer at a time (each float weight is released once its layer is done, so peak memory is the
model plus one layer's SVD). The adapters then fine-tune like QLoRA's. Any lowbit format can be the base:
NF4/NF2 codebooks, IntAffine at any width.

As a plain method (``quantize_(model, LoftQConfig(...))``), :meth:`LoftQConfig.quantize_weight` returns only
the quantized base ``Q_T`` of each layer; use :func:`apply_loftq` to keep the adapters.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from lowbit.config import ConfigError
from lowbit.formats.base import Format, QuantizedTensor, check_weight
from lowbit.methods.base import MethodConfig
from lowbit.methods.loftq.core import loftq

__all__ = ["LoftQConfig", "LoftQResult", "loftq_layer", "apply_loftq", "default_format"]

log = logging.getLogger(__name__)


def default_format(bits: int, group_size: int | None = None) -> Format:
    """LoftQ's default quantizer at ``bits``: NF4 block-wise (block 64, no double quantization, as LoftQ
    backbones are loaded) at 4 bits; IntAffine (asymmetric, group 64) at 2/3 bits (lowbit has no NF2/NF3
    storage format); symmetric per-channel int8 at 8 bits."""
    from lowbit.formats.affine import IntAffine
    from lowbit.formats.codebook import Codebook

    if bits == 4:
        return Codebook("nf4", block_size=group_size or 64, double_quant=False)
    if bits == 8:
        return IntAffine(bits=8, group_size=group_size, symmetric=True)
    return IntAffine(bits=bits, group_size=group_size or 64)


@dataclass(frozen=True)
class LoftQResult:
    """One layer's LoftQ output: the stored base and the LoRA factors (``Q + s·B A ≈ W``)."""

    qweight: QuantizedTensor
    A: torch.Tensor
    B: torch.Tensor


@dataclass(frozen=True)
class LoftQConfig(MethodConfig):
    """LoftQ with the reference's options.

    Attributes:
        format: the base's storage format (any lowbit format).
        rank: LoRA rank r.
        alpha: LoRA alpha; the factors are built for the scaling ``alpha / rank``.
        iters: alternating steps T (peft default 1; LoftQ's README uses 5).
    """

    kind: ClassVar[str] = "loftq"
    bits_choices: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)
    summary: ClassVar[str] = "LoftQ: quantized base + LoRA initialised by alternating quantize/SVD"
    paper: ClassVar[str] = "arXiv:2310.08659"

    format: Format
    rank: int = 16
    alpha: float = 16.0
    iters: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.format, Format):
            raise TypeError(f"LoftQConfig.format must be a lowbit Format, got {type(self.format).__name__}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoftQ rank must be an int >= 1, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ConfigError(f"LoftQ alpha must be > 0, got {self.alpha!r}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ConfigError(f"LoftQ iters must be an int >= 1, got {self.iters!r}")

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.rank

    def quantize_weight(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor] | None = None) -> QuantizedTensor:
        return loftq_layer(W, self).qweight

    @classmethod
    def for_bits(cls, bits: int, group_size: int | None = None, **options: Any) -> "LoftQConfig":
        """LoftQ over :func:`default_format` at ``bits`` (options: rank, alpha, iters)."""
        cls.check_bits(bits)
        return cls(format=default_format(bits, group_size), **options)


def loftq_layer(W: torch.Tensor, config: LoftQConfig) -> LoftQResult:
    """LoftQ for one weight ``W: (out, in)``; the rank is capped at ``min(out, in)``."""
    check_weight(W)
    config.format.validate_shape(tuple(W.shape))
    fmt = config.format
    r = min(config.rank, *W.shape)
    Q, A, B, X = loftq(W.detach(), lambda M: fmt.fake_quantize(M), r, config.iters, config.alpha / r)
    q = fmt.quantize(X)
    if q.dtype != W.dtype:
        q = dataclasses.replace(q, dtype=W.dtype)
    return LoftQResult(q, A, B)


def apply_loftq(model: nn.Module, config: LoftQConfig, *, targets: Sequence[str] = ("Linear",),
                ignore: Sequence[str] = (), dropout: float = 0.0,
                accept: Callable[[str, float, float], bool] | None = None) -> dict[str, tuple[float, float]]:
    """Quantize ``model``'s Linear layers with LoftQ and wrap them in LoRA adapters, in place, layer by layer.

    Args:
        model: a float model.
        config: format, rank, alpha, iters.
        targets, ignore: layer selection (as :func:`lowbit.quantize_`).
        dropout: LoRA dropout of the created adapters.
        accept: optional per-layer callback ``(name, err_plain, err_loftq) -> bool`` (Frobenius errors of
            ``W − Q`` with a plain quantization and of ``W − Q_T − s·B A``); when it returns False the layer
            gets the plain quantized base and zero-initialised adapters instead (peft's
            ``replace_lora_weights_loftq`` callback).

    Returns:
        ``name -> (‖W − q(W)‖_F, ‖W − Q_T − s·B A‖_F)`` per layer.
    """
    from lowbit.model.walk import iter_targets, set_submodule
    from lowbit.nn.linear import QuantLinear
    from lowbit.nn.lora import LoRALinear, LoRASpec

    for p in model.parameters():
        p.requires_grad_(False)
    layers = [n for n, _ in iter_targets(model, targets, ignore)]
    if not layers:
        raise ValueError(f"no Linear layer matched targets={list(targets)} ignore={list(ignore)}")
    errors: dict[str, tuple[float, float]] = {}
    for name in layers:
        lin = model.get_submodule(name)
        W = lin.weight.detach()
        res = loftq_layer(W, config)
        r = res.A.shape[0]
        spec = LoRASpec(r=r, alpha=config.alpha * r / config.rank, dropout=dropout)
        Wf = W.float()
        plain = config.format.quantize(W)
        e_plain = float(torch.linalg.norm(Wf - plain.dequantize().float()))
        e_loftq = float(torch.linalg.norm(Wf - res.qweight.dequantize().float() - spec.scaling * res.B @ res.A))
        errors[name] = (e_plain, e_loftq)
        bias = lin.bias.detach() if lin.bias is not None else None
        if accept is None or accept(name, e_plain, e_loftq):
            new = LoRALinear(QuantLinear(res.qweight, bias), spec)
            new.set_factors(res.A, res.B)
        else:
            new = LoRALinear(QuantLinear(plain, bias), spec)
        set_submodule(model, name, new)
        del lin, W, Wf
    log.info("LoftQ: %d layers, mean error ratio %.3f", len(errors),
             sum(b / a for a, b in errors.values() if a > 0) / max(1, len(errors)))
    return errors
