"""Merged export of a LoRA-tuned model: dequantize, merge, re-quantize with a chosen lowbit method.

Merging LoRA into a 4-bit base is lossy (peft issues #2321, #1043): the float merge ``W = deq(Q) + s·B A`` is
exact, re-quantizing it is not. :func:`merge_and_quantize` does the merge in float, re-quantizes with any
calibration-free lowbit method and reports what the re-quantization costs, per layer and (given tokens) on
the model's logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["MergeReport", "merge_and_quantize"]

log = logging.getLogger(__name__)


@dataclass
class MergeReport:
    """Error added by re-quantizing the merged weights.

    Attributes:
        method: the lowbit method that re-quantized them.
        layer_rel_error: per layer ``‖W_merged − deq(q(W_merged))‖_F / ‖W_merged‖_F``.
        mean_rel_error: mean of the above.
        logit_rmse: RMS difference of logits, merged float vs re-quantized (when tokens were given).
        logit_rmse_ref: RMS of the merged float model's logits, for scale.
    """

    method: str
    layer_rel_error: dict[str, float] = field(default_factory=dict)
    mean_rel_error: float = 0.0
    logit_rmse: float | None = None
    logit_rmse_ref: float | None = None


def merge_and_quantize(model: nn.Module, method: str = "nf4", bits: int = 4, group_size: int | None = None, *,
                       tokens: torch.Tensor | None = None) -> MergeReport:
    """Merge every LoRA adapter into its (dequantized) base, then re-quantize the merged layers, in place.

    Args:
        model: a model with :class:`~lowbit.nn.lora.LoRALinear` layers (QLoRA, LoftQ, plain LoRA).
        method: a registered calibration-free lowbit method (``nf4``, ``rtn``, ``hqq``, ...).
        bits, group_size: passed to the method's ``for_bits``.
        tokens: optional ``(batch, seq)`` ids; the report then includes the logit error.

    Returns:
        A :class:`MergeReport`; the model now holds ``QuantLinear`` layers and no adapters.
    """
    import re

    from lowbit.nn.lora import lora_layers, merge_lora

    names = list(lora_layers(model))
    if not names:
        raise ValueError("model has no LoRA layers to merge")
    merge_lora(model)
    merged_w = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    ref = None
    if tokens is not None:
        with torch.no_grad():
            ref = model(input_ids=tokens).logits.float()
    from lowbit.methods import get_method
    from lowbit.quantize import quantize_

    cfg = get_method(method).for_bits(bits, group_size)
    if cfg.stats:
        raise ValueError(f"method {method!r} needs calibration statistics; choose a calibration-free method")
    quantize_(model, cfg, targets=[f"^{re.escape(n)}$" for n in names])
    report = MergeReport(method=method)
    for n, W in merged_w.items():
        Wq = model.get_submodule(n).dequantize().float()
        report.layer_rel_error[n] = float(torch.linalg.norm(W - Wq) / torch.linalg.norm(W).clamp_min(1e-30))
    report.mean_rel_error = sum(report.layer_rel_error.values()) / len(report.layer_rel_error)
    if ref is not None:
        with torch.no_grad():
            out = model(input_ids=tokens).logits.float()
        report.logit_rmse = float((out - ref).pow(2).mean().sqrt())
        report.logit_rmse_ref = float(ref.pow(2).mean().sqrt())
    log.info("merged %d layers, re-quantized with %s: mean relative weight error %.4f", len(names), method,
             report.mean_rel_error)
    return report
