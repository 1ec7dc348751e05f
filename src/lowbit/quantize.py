"""``quantize_(model, config)``: replace the selected ``nn.Linear`` layers with ``QuantLinear`` in place.

Calibration-free methods (``config.stats == ()``) quantize layer by layer. Methods that declare statistics
run through the sequential calibration runner (:mod:`lowbit.calibration.sequential`), which needs
``calibration`` token batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from lowbit.formats.base import check_weight
from lowbit.methods.base import MethodConfig
from lowbit.model.walk import iter_targets, set_submodule
from lowbit.nn.linear import QuantLinear

__all__ = ["quantize_", "Progress"]

log = logging.getLogger(__name__)
T = TypeVar("T")
Progress = Callable[..., Iterable[Any]]
"""A progress wrapper with ``tqdm``'s call shape: ``progress(iterable, total=..., desc=...)``."""


def _no_progress(it: Iterable[T], **_: Any) -> Iterable[T]:
    return it


def quantize_(model: nn.Module, config: MethodConfig, *, targets: Sequence[str] = ("Linear",),
              ignore: Sequence[str] = (), calibration: torch.Tensor | None = None,
              progress: Progress | None = None) -> nn.Module:
    """Quantize ``model``'s Linear layers in place with ``config`` and return the model.

    Args:
        model: any ``nn.Module``; transformers decoder models for calibrated methods.
        config: a method config, e.g. ``RTNConfig(format=IntAffine(bits=4, group_size=128))``.
        targets: regexes of module names to quantize, or ``"Linear"`` for all Linear layers.
        ignore: regexes of module names to leave alone (``lm_head`` and embeddings are always left alone
            unless a target names them).
        calibration: ``(n_samples, seq_len)`` token ids, required when ``config.stats`` is not empty.
        progress: a ``tqdm``-like wrapper to show progress (the CLI passes ``tqdm``).
    """
    if not isinstance(config, MethodConfig):
        raise TypeError(f"config must be a lowbit MethodConfig (e.g. RTNConfig), got {type(config).__name__}")
    progress = progress or _no_progress
    if config.stats:
        if calibration is None:
            raise ValueError(f"method {config.kind!r} needs calibration data for statistics {list(config.stats)}; "
                             "pass calibration=token ids (see lowbit.data.corpora.calibration_tokens)")
        from lowbit.calibration.sequential import quantize_sequential

        return quantize_sequential(model, config, calibration, targets=targets, ignore=ignore, progress=progress)
    layers = list(iter_targets(model, targets, ignore))
    if not layers:
        raise ValueError(f"no Linear layer matched targets={list(targets)} ignore={list(ignore)}")
    for name, lin in progress(layers, total=len(layers), desc=f"{config.kind}"):
        replace_linear(model, name, lin, config)
    return model


def replace_linear(model: nn.Module, name: str, lin: nn.Linear, config: MethodConfig,
                   stats: dict[str, torch.Tensor] | None = None) -> QuantLinear:
    """Quantize one Linear with ``config`` (given its statistics) and swap in the ``QuantLinear``."""
    W = lin.weight.detach()
    check_weight(W, f"{name}.weight")
    try:
        config.format.validate_shape(tuple(W.shape))
    except ValueError as e:
        raise ValueError(f"layer {name}: {e}") from None
    q = config.quantize_weight(W, stats or {})
    new = QuantLinear(q, lin.bias.detach() if lin.bias is not None else None)
    set_submodule(model, name, new)
    return new
