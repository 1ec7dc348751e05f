"""``finetune(model, tokenizer, data, method=...)``: one entry point for quantized fine-tuning.

Methods (``method=``):

* ``"lora"`` — float base, LoRA on every linear layer (the 16-bit reference).
* ``"qlora"`` — base quantized with ``quant_method`` (default NF4 + double quantization, arXiv 2305.14314),
  LoRA on every linear layer.
* ``"loftq"`` — like QLoRA, with LoRA factors initialised by LoftQ's alternating quantize/SVD (arXiv 2310.08659).
* ``"qa_lora"`` — IntAffine group-quantized base, LoRA-A over group-pooled inputs (arXiv 2309.14717); merges
  exactly into the zero points.
* ``"peqa"`` — IntAffine base, only the scales train (arXiv 2305.14152).
* ``"qft"`` — full-parameter tuning with int8 weights, gradients and Lion momentum (arXiv 2310.07147).

Everything else (data, loop, eval, loss plot, adapter saving) is shared.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lowbit.train.data import TextSource, token_blocks, split_blocks

__all__ = ["finetune", "FinetuneResult", "StepInfo", "METHODS", "eval_loss"]

log = logging.getLogger(__name__)

METHODS = ("lora", "qlora", "loftq", "qa_lora", "peqa", "qft")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class StepInfo:
    """What the progress callback receives after every optimizer step."""

    step: int
    steps: int
    loss: float
    lr: float
    seconds: float
    eval_loss: float | None = None


@dataclass
class FinetuneResult:
    """Outcome of :func:`finetune`: per-step losses, eval loss before/after, where files went."""

    method: str
    steps: int
    losses: list[float]
    eval_loss_before: float | None
    eval_loss_after: float | None
    eval_points: list[tuple[int, float]] = field(default_factory=list)
    trainable_params: int = 0
    tokens: int = 0
    seconds: float = 0.0
    plot_path: str | None = None
    adapter_path: str | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def eval_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8,
              compute_dtype: torch.dtype = torch.float32) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` over ``blocks: (n, seq_len)``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), _autocast(compute_dtype):
        for i in range(0, blocks.shape[0], batch_size):
            b = blocks[i:i + batch_size]
            n_tok = b.numel() - b.shape[0]
            total += float(model(input_ids=b, labels=b).loss.float()) * n_tok
            count += n_tok
    model.train(was_training)
    return total / count


def _autocast(dtype: torch.dtype) -> contextlib.AbstractContextManager[object]:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


def finetune(model: nn.Module, tokenizer: object, data: TextSource, *, method: str = "qlora",
             steps: int = 100, lr: float | None = None, batch_size: int = 4, seq_len: int = 256,
             r: int = 16, alpha: float = 16.0, dropout: float = 0.05,
             quant_method: str | None = None, bits: int | None = None, group_size: int | None = None,
             loftq_iters: int = 1, compute_dtype: str = "float32", gradient_checkpointing: bool = False,
             weight_decay: float = 0.0, max_grad_norm: float | None = 0.3, warmup_steps: int = 0,
             eval_data: TextSource | None = None, eval_fraction: float = 0.1, eval_every: int = 0,
             max_blocks: int | None = None, output_dir: str | None = None, plot: bool = True,
             progress: Callable[[StepInfo], None] | None = None, seed: int = 0) -> FinetuneResult:
    """Fine-tune ``model`` in place with a quantization-aware method and return the loss history.

    Args:
        model: a transformers causal LM (float weights; the method quantizes it), e.g. the default model.
        tokenizer: anything with ``encode(text) -> ids`` (a transformers tokenizer, :class:`ByteTokenizer`).
        data: a text file/directory path, a list of strings, or ``(n, seq_len)`` token ids.
        method: one of :data:`METHODS`.
        steps: optimizer steps.
        lr: learning rate (None: the method's default — 2e-4 for LoRA-type, 1e-4 PEQA, 1e-4 QFT).
        batch_size, seq_len: sequences per step and tokens per sequence.
        r, alpha, dropout: LoRA rank, alpha (update scaled by alpha/r) and dropout (LoRA-type methods).
        quant_method, bits, group_size: how the base is quantized (None: the method's default — ``nf4`` 4-bit
            block 64 with double quantization for QLoRA/LoftQ, IntAffine 4-bit group 32 for QA-LoRA,
            IntAffine 4-bit per-channel for PEQA, int8 for QFT).
        loftq_iters: LoftQ's alternating steps T.
        compute_dtype: ``"float32"`` or ``"bfloat16"`` (autocast) for forward/backward.
        gradient_checkpointing: recompute activations in backward (transformers models).
        weight_decay, max_grad_norm, warmup_steps: optimizer settings (linear warmup, then constant LR).
        eval_data: held-out data (default: ``eval_fraction`` of ``data``'s blocks).
        eval_every: also evaluate every this many steps (0: only before and after).
        max_blocks: use at most this many blocks of ``data``.
        output_dir: write ``loss.png``, ``metrics.json`` and (LoRA-type methods) a peft adapter there.
        plot: write the loss plot when ``output_dir`` is set.
        progress: called with a :class:`StepInfo` after every step (the CLI passes a tqdm updater).
        seed: seeds batch order, dropout and adapter init.

    Returns:
        A :class:`FinetuneResult`.
    """
    from lowbit.train.prepare import prepare

    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; valid choices: {list(METHODS)}")
    if compute_dtype not in DTYPES:
        raise ValueError(f"unknown compute_dtype {compute_dtype!r}; valid choices: {sorted(DTYPES)}")
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    dtype = DTYPES[compute_dtype]
    torch.manual_seed(seed)

    blocks = token_blocks(tokenizer, data, seq_len, max_blocks=max_blocks)
    if eval_data is not None:
        train_blocks, eval_blocks = blocks, token_blocks(tokenizer, eval_data, seq_len)
    elif eval_fraction > 0:
        train_blocks, eval_blocks = split_blocks(blocks, eval_fraction, seed)
    else:
        train_blocks, eval_blocks = blocks, None

    trainable = prepare(method, model, r=r, alpha=alpha, dropout=dropout, quant_method=quant_method, bits=bits,
                        group_size=group_size, loftq_iters=loftq_iters, lr=lr, weight_decay=weight_decay)
    if gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ValueError(f"gradient_checkpointing needs a transformers model, got {type(model).__name__}")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = trainable.optimizer
    base_lrs = [g["lr"] for g in opt.param_groups]
    n_trainable = trainable.n_params
    log.info("%s: %d trainable parameters, %d train blocks of %d tokens", method, n_trainable,
             train_blocks.shape[0], seq_len)

    before = eval_loss(model, eval_blocks, batch_size, dtype) if eval_blocks is not None else None
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    points: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, train_blocks.shape[0], (batch_size,), generator=g)
        batch = train_blocks[idx]
        warm = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
        for grp, base in zip(opt.param_groups, base_lrs):
            grp["lr"] = base * warm
        with _autocast(dtype):
            loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{method}: loss is {float(loss)} at step {step}; lower lr or use float32")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None and trainable.clip:
            torch.nn.utils.clip_grad_norm_(trainable.params, max_grad_norm)
        opt.step()
        losses.append(float(loss.detach()))
        ev = None
        if eval_blocks is not None and eval_every and step % eval_every == 0 and step < steps:
            ev = eval_loss(model, eval_blocks, batch_size, dtype)
            points.append((step, ev))
            model.train()
        if progress is not None:
            progress(StepInfo(step, steps, losses[-1], opt.param_groups[0]["lr"], time.perf_counter() - t0, ev))
    seconds = time.perf_counter() - t0
    model.eval()
    if gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    after = eval_loss(model, eval_blocks, batch_size, dtype) if eval_blocks is not None else None
    if after is not None:
        points.append((steps, after))
    if before is not None:
        points.insert(0, (0, before))
    trainable.finish()

    result = FinetuneResult(method=method, steps=steps, losses=losses, eval_loss_before=before,
                            eval_loss_after=after, eval_points=points, trainable_params=n_trainable,
                            tokens=steps * batch_size * seq_len, seconds=seconds, extra=trainable.extra)
    if output_dir is not None:
        _write_outputs(model, result, output_dir, plot, trainable.peft_compatible)
    return result


def _write_outputs(model: nn.Module, result: FinetuneResult, output_dir: str, plot: bool, peft_ok: bool) -> None:
    from lowbit.nn.lora import save_adapter
    from lowbit.train.plot import plot_losses

    os.makedirs(output_dir, exist_ok=True)
    if plot:
        result.plot_path = plot_losses({result.method: result.losses}, os.path.join(output_dir, "loss.png"),
                                       eval_points={result.method: result.eval_points},
                                       title=f"lowbit finetune --method {result.method}")
    if peft_ok:
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        result.adapter_path = save_adapter(model, os.path.join(output_dir, "adapter"), base_model_name_or_path=name)
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(result.to_dict(), f, indent=2)
