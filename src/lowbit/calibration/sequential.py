"""The sequential calibration runner: one decoder block at a time, statistics by hooks, quantized outputs onward.

Algorithm (GPTQ, arXiv 2210.17323, §4 "sequential"; the same loop serves SpQR, SqueezeLLM, AWQ, SmoothQuant):

1. Run the model on the calibration tokens until decoder block 0 is called, and keep that call's inputs: the
   hidden states and every keyword argument the block needs (attention mask, ``position_embeddings`` that
   transformers 5.x computes once in the model, ``position_ids``; caches are dropped). Nothing after block 0
   runs, so no whole-model activations are ever held.
2. For each block: find its target Linear layers; split them into true-sequential stages (layers reading the
   same tensor: q/k/v, o, gate/up, down; :func:`lowbit.model.blocks.linear_stages`); for each stage, re-run the
   block (stopping as soon as the stage's layers have seen their inputs) with hooks that accumulate exactly
   the statistics the method declares in ``config.stats``, then quantize the stage's layers with
   :func:`lowbit.quantize.replace_linear`. Later stages therefore see the already quantized earlier ones.
3. Run the quantized block on its inputs; the outputs are the next block's inputs.

Peak memory is one block plus the calibration activations at one block boundary (``n_samples × seq_len ×
hidden`` floats) plus one layer's statistics.

``fisher`` is different: it needs gradients of the language-model loss through the whole model, so it is
computed once, on the unquantized model, before the block loop (:func:`lowbit.calibration.hooks.fisher_diagonal`).

Extension points for block-level transforms (AWQ, SmoothQuant), read from the method config if present:

``config.prepare_block(block, block_inputs, stats_by_layer) -> None``
    Called once per block before any of its layers is quantized. ``block_inputs`` is a list of
    :class:`BlockCall` (``.args``, ``.kwargs``; ``block(*c.args, **c.kwargs)`` runs the block on one batch);
    ``stats_by_layer`` maps each target layer's name *relative to the block* (``"self_attn.q_proj"``) to its
    statistics (``config.stats``) collected on the unmodified block. It may edit the block's float weights in
    place (scales, clipping); the runner then collects fresh statistics per stage on the edited block.
``config.sequential_inputs``: ``"quantized"`` (default, GPTQ) or ``"fp"``
    Which outputs become the next block's inputs: those of the quantized block, or those of the float block
    (after ``prepare_block``), as AWQ's reference does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowbit.calibration.hooks import StopForward, collect_input_stats, fisher_diagonal
from lowbit.calibration.stats import INPUT_STATS
from lowbit.methods.base import MethodConfig
from lowbit.model.blocks import find_blocks, linear_stages
from lowbit.model.walk import iter_targets

if TYPE_CHECKING:
    from lowbit.calibration.distributed import ShardedCalibration

__all__ = ["BlockCall", "capture_block_inputs", "check_calibration", "quantize_block", "quantize_sequential",
           "run_block", "with_hidden"]

log = logging.getLogger(__name__)

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


@dataclass
class BlockCall:
    """The positional and keyword arguments of one call of a decoder block (one calibration batch)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _Captured(Exception):
    pass


def check_calibration(calibration: Any) -> torch.Tensor:
    """``calibration`` if it is a non-empty 2-D integer tensor of token ids; a clear error otherwise."""
    if not isinstance(calibration, torch.Tensor):
        raise TypeError(f"calibration must be a torch.Tensor of token ids, got {type(calibration).__name__}")
    if calibration.dim() != 2 or calibration.is_floating_point() or calibration.numel() == 0:
        raise ValueError("calibration must be a non-empty integer tensor (n_samples, seq_len) of token ids, got "
                         f"shape {tuple(calibration.shape)} dtype {calibration.dtype}")
    return calibration


def capture_block_inputs(model: nn.Module, block: nn.Module, calibration: torch.Tensor,
                         batch_size: int = 8) -> list[BlockCall]:
    """Run ``model`` on ``calibration`` up to ``block`` and return the block's call arguments per batch.

    Args:
        model: the full model (called as ``model(input_ids, use_cache=False)``).
        block: the first decoder block.
        calibration: ``(n_samples, seq_len)`` token ids.
        batch_size: samples per forward call.
    """
    calls: list[BlockCall] = []

    def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kw = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
        if "use_cache" in kw:
            kw["use_cache"] = False
        calls.append(BlockCall(tuple(args), kw))
        raise _Captured

    dev = next(model.parameters()).device
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in torch.split(calibration, batch_size):
            try:
                model(ids.to(dev), use_cache=False)
            except _Captured:
                continue
            raise RuntimeError(f"{type(model).__name__} never called its first decoder block; cannot calibrate")
    finally:
        handle.remove()
    return calls


def run_block(block: nn.Module, call: BlockCall) -> torch.Tensor:
    """Call ``block`` on one captured batch and return its hidden-state output (tuple outputs: the first item)."""
    out = block(*call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def with_hidden(call: BlockCall, hidden: torch.Tensor) -> BlockCall:
    """``call`` with its hidden-state input replaced by ``hidden`` (the previous block's output)."""
    if call.args:
        return BlockCall((hidden, *call.args[1:]), call.kwargs)
    return BlockCall((), {**call.kwargs, "hidden_states": hidden})


def _collect(block: nn.Module, layers: dict[str, nn.Module], names: Sequence[str], calls: list[BlockCall],
             stop_early: bool) -> dict[str, dict[str, torch.Tensor]]:
    with collect_input_stats(layers, names, stop_early=stop_early) as stats:
        for call in calls:
            try:
                run_block(block, call)
            except StopForward:
                pass
    return {n: identity_if_unseen(n, s.n, s.result()) for n, s in stats.items()}


def identity_if_unseen(name: str, n_tokens: int, res: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``res`` with an identity Hessian if layer ``name`` saw no calibration token (an MoE expert): GPTQ-style
    methods then round to nearest instead of zeroing every "dead" input."""
    if n_tokens == 0 and "hessian" in res:
        log.warning("layer %s saw no calibration tokens; using an identity Hessian (round-to-nearest). "
                    "More or more varied calibration data avoids this.", name)
        res["hessian"] = torch.eye(res["hessian"].shape[0], dtype=res["hessian"].dtype, device=res["hessian"].device)
    return res


def quantize_block(block: nn.Module, names: Sequence[str], config: MethodConfig, calls: list[BlockCall],
                   quantize_layer: Callable[[str, nn.Module, dict[str, torch.Tensor]], None], *,
                   true_sequential: bool = True, shards: ShardedCalibration | None = None) -> list[BlockCall]:
    """Quantize one decoder block's target layers with calibration statistics; return the next block's inputs.

    Steps 2 and 3 of the module doc for one block: ``config.prepare_block`` (if any) on statistics of the
    unmodified block, then stage by stage (:func:`lowbit.model.blocks.linear_stages`) fresh input statistics
    and ``quantize_layer(name, layer, stats)`` for each layer, then the block's outputs (quantized or float, by
    ``config.sequential_inputs``) as the next block's :class:`BlockCall` list. Both the in-memory runner
    (:func:`quantize_sequential`) and streaming (:mod:`lowbit.io.streaming`) call this.

    Args:
        block: the decoder block, materialized, with float target layers.
        names: target layer names relative to ``block`` (``"self_attn.q_proj"``).
        config: the method config (its input statistics are collected; ``fisher`` is the caller's business).
        calls: the block's inputs, one :class:`BlockCall` per calibration batch.
        quantize_layer: replaces one layer (the caller knows the model and where the block sits in it).
        true_sequential: stage by stage; False collects all of the block's statistics in one pass.
        shards: this rank's share of a distributed run (:mod:`lowbit.calibration.distributed`): ``calls`` are
            the rank's own batches, statistics are reduced over ranks, a stage's layers are quantized in parallel.
    """
    collect = _collect if shards is None else shards.collect_block
    input_stats = [s for s in config.stats if s in INPUT_STATS]
    layers = {n: block.get_submodule(n) for n in names}
    prepare = getattr(config, "prepare_block", None)
    if prepare is not None and names:
        prepare(block, calls if shards is None else shards.all_calls(calls),
                collect(block, layers, input_stats, calls, stop_early=False))
    fp_out = [run_block(block, c) for c in calls] if getattr(config, "sequential_inputs", "quantized") == "fp" else None
    if true_sequential and len(names) > 1:
        stages = linear_stages(block, list(names), lambda: run_block(block, calls[0]))
    else:
        stages = [list(names)] if names else []
    for stage in stages:
        stage_layers = {n: block.get_submodule(n) for n in stage}
        stats = (collect(block, stage_layers, input_stats, calls, stop_early=True) if input_stats
                 else {n: {} for n in stage})
        if shards is not None:
            shards.quantize_stage(block, stage_layers, stats, quantize_layer)
            continue
        for n in stage:
            quantize_layer(n, stage_layers[n], dict(stats[n]))
    outs = fp_out if fp_out is not None else [run_block(block, c) for c in calls]
    return [with_hidden(c, h) for c, h in zip(calls, outs)]


def quantize_sequential(model: nn.Module, config: MethodConfig, calibration: torch.Tensor, *,
                        targets: Sequence[str] = ("Linear",), ignore: Sequence[str] = (),
                        progress: Callable[..., Iterable[Any]] | None = None, batch_size: int = 8,
                        true_sequential: bool = True,
                        distributed: ShardedCalibration | bool | None = None) -> nn.Module:
    """Quantize ``model``'s target Linear layers block by block with calibration statistics (see module doc).

    Args:
        model: a transformers-style decoder LM (blocks found by :func:`lowbit.model.blocks.find_blocks`).
        config: a method config whose ``stats`` name the statistics its ``quantize_weight`` needs.
        calibration: ``(n_samples, seq_len)`` token ids.
        targets, ignore: layer selection, as in :func:`lowbit.quantize.quantize_`.
        progress: ``tqdm``-like wrapper; called once over the blocks.
        batch_size: calibration samples per forward call.
        true_sequential: quantize a block's layers stage by stage (q/k/v, o, gate/up, down), re-collecting
            statistics after each stage; False collects all of a block's statistics in one pass.
        distributed: split the calibration batches over torch.distributed ranks (every rank calls this with
            the same model and calibration): None (default) when a process group of more than one rank exists
            or ``torchrun``'s environment asks for one; True always (world size 1 without a process group: the
            one-process reference, same summation order); False never; or a
            :class:`~lowbit.calibration.distributed.ShardedCalibration`. See :mod:`lowbit.calibration.distributed`.

    Returns:
        ``model``, quantized in place.
    """
    from lowbit.calibration.distributed import ShardedCalibration
    from lowbit.quantize import replace_linear  # quantize.py imports this module lazily; avoid a cycle

    calibration = check_calibration(calibration)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sequential_inputs = getattr(config, "sequential_inputs", "quantized")
    if sequential_inputs not in ("quantized", "fp"):
        raise ValueError(f"config.sequential_inputs must be 'quantized' or 'fp', got {sequential_inputs!r}")
    progress = progress or (lambda it, **_: it)
    bad = [s for s in config.stats if s not in (*INPUT_STATS, "fisher")]
    if bad:
        raise ValueError(f"method {config.kind!r} declares unknown statistic(s) {bad}; "
                         f"valid choices: {[*INPUT_STATS, 'fisher']}")
    input_stats = [s for s in config.stats if s != "fisher"]
    selected = dict(iter_targets(model, targets, ignore))
    if not selected:
        raise ValueError(f"no Linear layer matched targets={list(targets)} ignore={list(ignore)}")
    shards = ShardedCalibration.resolve(distributed)
    own = calibration if shards is None else shards.shard(calibration, batch_size)

    was_training = model.training
    model.eval()
    try:
        fisher: dict[str, torch.Tensor] = {}
        if "fisher" in config.stats:
            fisher = (fisher_diagonal(model, calibration, list(selected), batch_size=1) if shards is None
                      else shards.fisher(model, calibration, list(selected)))
        with torch.no_grad():
            if not input_stats and getattr(config, "prepare_block", None) is None:
                # gradient statistics only (SqueezeLLM): quantizing needs no block inputs at all
                for name, lin in progress(list(selected.items()), total=len(selected), desc=f"{config.kind}"):
                    st = {"fisher": fisher.pop(name)} if name in fisher else {}
                    replace_linear(model, name, lin, config, st)
                return model
            path, blocks = find_blocks(model)
            calls = capture_block_inputs(model, blocks[0], own, batch_size)
            if shards is not None and getattr(config, "prepare_block", None) is not None:
                shards.keep_all_calls(capture_block_inputs(model, blocks[0], calibration, batch_size))
            done: set[str] = set()
            for i, block in progress(list(enumerate(blocks)), total=len(blocks), desc=f"{config.kind} blocks"):
                prefix = f"{path}.{i}."
                rel = [n[len(prefix):] for n in selected if n.startswith(prefix)]

                def quantize_layer(n: str, lin: nn.Module, st: dict[str, torch.Tensor], prefix: str = prefix) -> None:
                    full = prefix + n
                    if full in fisher:
                        st["fisher"] = fisher.pop(full)
                    replace_linear(model, full, lin, config, st)  # type: ignore[arg-type]

                calls = quantize_block(block, rel, config, calls, quantize_layer, true_sequential=true_sequential,
                                       shards=shards)
                done.update(prefix + n for n in rel)
                log.info("%s: block %d/%d quantized (%d layers)", config.kind, i + 1, len(blocks), len(rel))
            del calls
            rest = [n for n in selected if n not in done]
            if rest:
                _quantize_outside_blocks(model, config, own, rest, input_stats, fisher, batch_size, shards)
    finally:
        model.train(was_training)
    return model


def _quantize_outside_blocks(model: nn.Module, config: MethodConfig, calibration: torch.Tensor, names: list[str],
                             input_stats: list[str], fisher: dict[str, torch.Tensor], batch_size: int,
                             shards: ShardedCalibration | None = None) -> None:
    """Layers outside the decoder blocks (e.g. an explicitly targeted ``lm_head``): statistics from full passes
    of the already quantized model, one layer at a time."""
    from lowbit.quantize import replace_linear

    dev = next(model.parameters()).device
    for name in names:
        lin = model.get_submodule(name)
        st: dict[str, torch.Tensor] = {}
        if input_stats and shards is not None:  # every rank quantizes it with the reduced statistics
            st = shards.collect_model(model, {name: lin}, input_stats, calibration, batch_size)[name]
        elif input_stats:
            with collect_input_stats({name: lin}, input_stats, stop_early=True) as acc:
                for ids in torch.split(calibration, batch_size):
                    try:
                        model(ids.to(dev), use_cache=False)
                    except StopForward:
                        pass
            st = acc[name].result()
        if name in fisher:
            st["fisher"] = fisher.pop(name)
        replace_linear(model, name, lin, config, st)  # type: ignore[arg-type]
        log.info("%s: %s quantized outside the decoder blocks", config.kind, name)
