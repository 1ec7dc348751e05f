"""Per-method preparation for :func:`lowbit.train.finetune`: quantize the base, add what trains, pick the optimizer."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Trainable", "prepare", "quantize_base"]

log = logging.getLogger(__name__)


@dataclass
class Trainable:
    """What a method hands the training loop.

    Attributes:
        params: the tensors that train (for gradient clipping and counting).
        optimizer: steps them (a ``torch.optim.Optimizer`` or one with the same ``step``/``zero_grad``).
        n_params: number of trainable scalars.
        clip: whether the loop clips ``params``' gradient norm (QFT keeps gradients off ``.grad``).
        peft_compatible: the adapters can be saved in peft's format.
        finish: called once after training (e.g. write tuned scales back into the quantized layers).
        extra: numbers worth reporting (bytes of model state, ...).
    """

    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    n_params: int
    clip: bool = True
    peft_compatible: bool = False
    finish: Callable[[], None] = lambda: None
    extra: dict[str, float] = field(default_factory=dict)


def quantize_base(model: nn.Module, quant_method: str, bits: int, group_size: int | None) -> nn.Module:
    """Quantize every Linear layer (not ``lm_head``) of ``model`` with a registered lowbit method, in place."""
    from lowbit.methods import get_method
    from lowbit.quantize import quantize_

    cfg = get_method(quant_method).for_bits(bits, group_size)
    if cfg.stats:
        raise ValueError(f"quant_method {quant_method!r} needs calibration statistics {list(cfg.stats)}; "
                         "finetune quantizes the base with a calibration-free method (e.g. 'nf4', 'rtn', 'hqq')")
    return quantize_(model, cfg)


def _adamw(params: list[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))


def _lora_like(model: nn.Module, lr: float, weight_decay: float) -> Trainable:
    from lowbit.nn.lora import lora_parameters

    params = lora_parameters(model)
    return Trainable(params, _adamw(params, lr, weight_decay), sum(p.numel() for p in params), peft_compatible=True)


def prepare(method: str, model: nn.Module, *, r: int, alpha: float, dropout: float, quant_method: str | None,
            bits: int | None, group_size: int | None, loftq_iters: int, lr: float | None,
            weight_decay: float) -> Trainable:
    """Turn ``model`` (float) into the trainable form of ``method``, in place."""
    from lowbit.nn.lora import LoRASpec, add_lora

    spec = LoRASpec(r=r, alpha=alpha, dropout=dropout)
    if method == "lora":
        add_lora(model, spec)
        return _lora_like(model, lr or 2e-4, weight_decay)
    if method == "qlora":
        quantize_base(model, quant_method or "nf4", bits or 4, group_size)
        add_lora(model, spec)
        return _lora_like(model, lr or 2e-4, weight_decay)
    if method == "loftq":
        from lowbit.methods.loftq.api import LoftQConfig, apply_loftq

        cfg = LoftQConfig.for_bits(bits or 4, group_size, rank=r, alpha=alpha, iters=loftq_iters)
        apply_loftq(model, cfg, dropout=dropout)
        return _lora_like(model, lr or 2e-4, weight_decay)
    if method == "qa_lora":
        from lowbit.methods.qa_lora.api import QALoRAConfig, apply_qa_lora

        cfg = QALoRAConfig.for_bits(bits or 4, group_size, rank=r, alpha=alpha, dropout=dropout)
        apply_qa_lora(model, cfg)
        t = _lora_like(model, lr or 2e-4, weight_decay)
        t.peft_compatible = False
        return t
    if method == "peqa":
        from lowbit.methods.peqa.api import PEQAConfig, apply_peqa, scale_parameters, finish_peqa

        cfg = PEQAConfig.for_bits(bits or 4, group_size)
        apply_peqa(model, cfg)
        params = scale_parameters(model)
        return Trainable(params, _adamw(params, lr or 1e-4, weight_decay), sum(p.numel() for p in params),
                         finish=lambda: finish_peqa(model))
    if method == "qft":
        from lowbit.methods.qft.api import QFTConfig, apply_qft

        cfg = QFTConfig.for_bits(bits or 8, group_size)
        opt = apply_qft(model, cfg, lr=lr or 1e-4, weight_decay=weight_decay)
        return Trainable(opt.float_params(), opt, opt.n_params(), clip=False,
                         extra={"model_state_bytes": float(opt.model_state_bytes())})
    raise ValueError(f"unknown fine-tuning method {method!r}")
