"""Hooks that collect statistics: inputs of Linear layers during forward, squared gradients for the Fisher.

:func:`collect_input_stats` is what the sequential runner uses for every block; other code (AWQ/SmoothQuant
transforms, importance matrices) can use it on any module the same way::

    with collect_input_stats({"q_proj": block.self_attn.q_proj}, ["act_absmax"]) as stats:
        block(hidden, **kwargs)
    stats["q_proj"].result()["act_absmax"]
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lowbit.calibration.stats import InputStats

__all__ = ["StopForward", "collect_input_stats", "fisher_diagonal"]

log = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised by a hook once every watched layer has seen its input, to skip the rest of a forward pass."""


@contextlib.contextmanager
def collect_input_stats(modules: Mapping[str, nn.Module], names: Iterable[str], *, stop_early: bool = False,
                        device: torch.device | str | None = None) -> Iterator[dict[str, InputStats]]:
    """Accumulate input statistics of ``modules`` while the context is open.

    Args:
        modules: layers to watch by name; each must take its input as the first positional argument and have
            ``in_features`` (``nn.Linear``, ``QuantLinear``).
        names: statistic names (:data:`lowbit.calibration.stats.INPUT_STATS`).
        stop_early: raise :class:`StopForward` once every watched layer has run in the current forward call,
            so the caller can skip the rest of the computation (catch it around the call).
        device: where accumulators live (default: each layer's weight device).

    Yields:
        ``{name: InputStats}``, filled as forward passes run.
    """
    names = tuple(names)
    stats: dict[str, InputStats] = {}
    fired: set[str] = set()
    handles = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            stats[name].update(args[0])
            if stop_early:
                fired.add(name)
                if len(fired) == len(stats):
                    fired.clear()
                    raise StopForward
        return hook

    for name, mod in modules.items():
        dev = device
        if dev is None:
            p = next(iter(mod.buffers()), None) if getattr(mod, "weight", None) is None else mod.weight
            dev = p.device if p is not None else "cpu"
        stats[name] = InputStats(names, int(mod.in_features), dev)  # type: ignore[arg-type]
        handles.append(mod.register_forward_pre_hook(make_hook(name)))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def fisher_diagonal(model: nn.Module, calibration: torch.Tensor, layer_names: Sequence[str], *,
                    batch_size: int = 1, progress: Callable[..., Iterable[Any]] | None = None) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal ``F = mean over samples of (∂L/∂W)²`` for the named Linear weights.

    ``L`` is the causal language-model loss of each sample (SqueezeLLM, arXiv 2306.07629, §3.2 uses the squared
    gradients summed over calibration samples; the mean differs by a constant that k-means does not see).
    Parameters other than the named weights do not get gradients, and the model's training mode and
    ``requires_grad`` flags are restored afterwards.

    Args:
        model: a causal LM returning ``.logits`` (transformers style).
        calibration: ``(n_samples, seq_len)`` token ids.
        layer_names: dotted names of ``nn.Linear`` layers.
        batch_size: samples per backward pass (the squared gradient is taken per batch).

    Returns:
        ``{layer_name: F}`` with ``F: (out_features, in_features)`` fp32 on the weight's device.
    """
    if calibration.dim() != 2:
        raise ValueError(f"calibration must be (n_samples, seq_len) token ids, got shape {tuple(calibration.shape)}")
    weights = {n: model.get_submodule(n).weight for n in layer_names}
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    fisher = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in weights.items()}
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        dev = next(iter(weights.values())).device
        batches = list(torch.split(calibration, batch_size))
        it = progress(batches, total=len(batches), desc="fisher") if progress else batches
        for ids in it:
            ids = ids.to(dev)
            logits = model(ids).logits
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            grads = torch.autograd.grad(loss, list(weights.values()))
            for n, g in zip(weights, grads):
                fisher[n].add_(g.float().square(), alpha=1.0 / len(batches))
    finally:
        for p, r in saved.items():
            p.requires_grad_(r)
        model.train(was_training)
    return fisher
