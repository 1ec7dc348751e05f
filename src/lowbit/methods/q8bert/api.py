"""``Q8BERTConfig``: Q8BERT quantization-aware training (arXiv 1910.06188) for BERT-style encoders.

``apply_q8bert(model, Q8BERTConfig())`` replaces every ``nn.Linear`` (Q, K, V, attention output, FFN,
pooler) and ``nn.Embedding`` (word, position, token type) by fake-quantized modules: symmetric 8-bit weights
(threshold max|W|, recomputed each step), 8-bit inputs of every linear layer (threshold: EMA of max|x|,
decay 0.9999), straight-through gradients. LayerNorm, softmax and GELU stay float, as in the paper. Train as
usual; :func:`export_int8` then gives int8 weights with one scale each (about 4x smaller than fp32).

Post-training quantization (the paper's control) is the same modules with no training:
:func:`calibrate` runs a few batches to set the activation thresholds (``decay`` 0 for PTQ: plain max).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from lowbit.config import ConfigError
from lowbit.formats.base import Format, QuantizedTensor
from lowbit.methods.base import MethodConfig
from lowbit.methods.q8bert.core import ema, fake_quantize_ste, quantize, scale_for

__all__ = ["Q8BERTConfig", "QATLinear", "QATEmbedding", "apply_q8bert", "export_int8", "calibrate"]


class _Observer(nn.Module):
    """Activation threshold ``M_x``: EMA of max|x| in training, frozen in eval."""

    def __init__(self, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            m = x.detach().abs().amax().float()
            with torch.no_grad():
                if bool(self.initialized):
                    self.threshold.copy_(ema(self.threshold, m, self.decay))
                else:
                    self.threshold.copy_(m)
                    self.initialized.fill_(True)
        if not bool(self.initialized):
            raise RuntimeError("activation threshold not set: run training or calibrate() before eval")
        return self.threshold


class QATLinear(nn.Module):
    """``y = fake(x; M_x) @ fake(W; max|W|)ᵀ + b`` with straight-through gradients (bias stays float;
    the paper stores it int32 at scale ``S_x·S_W`` on export)."""

    def __init__(self, linear: nn.Linear, bits: int, decay: float) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.bits = bits
        self.act = _Observer(decay)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = fake_quantize_ste(x, self.act(x), self.bits)
        wq = fake_quantize_ste(self.weight, self.weight.detach().abs().amax(), self.bits)
        return nn.functional.linear(xq, wq, self.bias)


class QATEmbedding(nn.Module):
    """An embedding whose table is fake-quantized to 8 bits (threshold max|E|)."""

    def __init__(self, emb: nn.Embedding, bits: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx = emb.padding_idx
        self.weight = emb.weight
        self.bits = bits

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        wq = fake_quantize_ste(self.weight, self.weight.detach().abs().amax(), self.bits)
        return nn.functional.embedding(ids, wq, self.padding_idx)


@dataclass(frozen=True)
class Q8BERTConfig(MethodConfig):
    """Q8BERT settings.

    Attributes:
        format: symmetric per-tensor int8 (``Int8Rowwise(granularity="tensor")``), what the export stores.
        decay: EMA decay of activation thresholds (paper 0.9999).
        quantize_embeddings: also fake-quantize the embedding tables (paper: yes).
    """

    kind: ClassVar[str] = "q8bert"
    bits_choices: ClassVar[tuple[int, ...]] = (8,)
    summary: ClassVar[str] = "Q8BERT: 8-bit symmetric QAT for BERT encoders (EMA ranges, STE)"
    paper: ClassVar[str] = "arXiv:1910.06188"

    format: Format
    decay: float = 0.9999
    quantize_embeddings: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.decay, (int, float)) or not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"decay must be in [0, 1), got {self.decay!r} (paper: 0.9999)")

    def quantize_weight(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor] | None = None) -> QuantizedTensor:
        """Symmetric per-tensor int8 of ``W`` (the export of one trained weight)."""
        return self.format.quantize(W)

    @classmethod
    def for_bits(cls, bits: int = 8, group_size: int | None = None, **options: Any) -> "Q8BERTConfig":
        from lowbit.formats.int8_rowwise import Int8Rowwise

        cls.check_bits(bits)
        return cls(format=Int8Rowwise(granularity="tensor"), **options)


def apply_q8bert(model: nn.Module, config: Q8BERTConfig | None = None, *, ignore: Sequence[str] = ()) -> list[str]:
    """Swap every ``nn.Linear``/``nn.Embedding`` of ``model`` (names matching ``ignore`` regexes excepted,
    e.g. a classifier head) for its fake-quantized version, in place. Parameters stay the same tensors."""
    import re

    from lowbit.model.walk import set_submodule

    cfg = config or Q8BERTConfig.for_bits(8)
    pats = [re.compile(p) for p in ignore]
    done = []
    for name, mod in list(model.named_modules()):
        if any(p.search(name) for p in pats):
            continue
        if isinstance(mod, nn.Linear):
            set_submodule(model, name, QATLinear(mod, 8, cfg.decay))
        elif isinstance(mod, nn.Embedding) and cfg.quantize_embeddings:
            set_submodule(model, name, QATEmbedding(mod, 8))
        else:
            continue
        done.append(name)
    if not done:
        raise ValueError(f"{type(model).__name__} has no Linear/Embedding layer to quantize")
    return done


@torch.no_grad()
def calibrate(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], decay: float | None = None) -> None:
    """Set activation thresholds from ``batches`` (dicts of model inputs) without training (PTQ).

    ``decay=None`` keeps each layer's decay; ``0.0`` makes the threshold the last batch's max.
    """
    observers = [m for m in model.modules() if isinstance(m, _Observer)]
    saved = [o.decay for o in observers]
    if decay is not None:
        for o in observers:
            o.decay = decay
    was = model.training
    model.train()
    for b in batches:
        model(**b)
    model.train(was)
    for o, d in zip(observers, saved):
        o.decay = d


def export_int8(model: nn.Module) -> dict[str, torch.Tensor]:
    """int8 weights and fp32 scales of every fake-quantized layer: ``<name>.qdata`` (int8),
    ``<name>.scale`` (``1/S_W``), and for linear layers ``<name>.act_scale`` (``1/S_x``)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, (QATLinear, QATEmbedding)):
            W = m.weight.detach().float()
            S = scale_for(W.abs().amax(), 8)
            out[f"{name}.qdata"] = quantize(W, S, 8).to(torch.int8)
            out[f"{name}.scale"] = (1.0 / S).reshape(1)
            if isinstance(m, QATLinear):
                out[f"{name}.act_scale"] = (1.0 / scale_for(m.act.threshold, 8)).reshape(1)
    return out
