"""QLoRA over several processes with FSDP2 (``torch.distributed.fsdp.fully_shard``), data parallel.

Storage, and why sharding cannot corrupt the NF4 base: FSDP2 shards ``nn.Parameter`` objects only (each
becomes a ``DTensor`` split along dim 0; it all-gathers them around forward/backward and reduce-scatters
their gradients). A quantized layer (:class:`lowbit.nn.linear.QuantLinear`) keeps its packed 4-bit codes
(``qdata``, uint8, two codes per byte), ``absmax``/``scale`` and the double-quantization state as
**buffers**, which FSDP2 never shards, casts (its ``MixedPrecisionPolicy`` applies to parameters) or views
as another dtype: every rank holds the complete, bit-exact base and only moves it to its device. What FSDP2
does shard are the float parameters: the trainable LoRA factors (with their gradients and AdamW state) and
the frozen embeddings, norms, ``lm_head`` and biases. The price is that the 4-bit base (about half a byte per
weight) is replicated, not divided by N; keeping packed bytes as uint8 parameters would let FSDP2 shard them
along dim 0 too, but then a dtype-mixed all-gather and any cast would touch them, which we avoid.

Training is data parallel: each step every rank draws the same global batch (same seed) and runs its
``batch_size / N`` rows; FSDP2 averages the gradients, so with equal-length sequences the step equals a
one-process step on the whole batch up to floating-point summation order. The reported loss is the mean
over ranks. Launch with ``torchrun --nproc_per_node N`` (NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from lowbit.calibration.distributed import init_from_env

__all__ = ["QLoRARun", "prepare_qlora", "shard_model", "train_qlora", "unsharded_lora_state"]

log = logging.getLogger(__name__)


def _world(distributed: bool | None = None) -> tuple[int, int]:
    if distributed is not False and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def prepare_qlora(model: nn.Module, *, r: int = 16, alpha: float = 16.0, dropout: float = 0.0,
                  quant_method: str = "nf4", bits: int = 4, group_size: int | None = None,
                  device: torch.device | str | None = None, seed: int = 0,
                  distributed: bool | None = None) -> nn.Module:
    """Quantize ``model``'s base (calibration-free method, NF4 by default), add LoRA, move it to ``device``
    and, when torch.distributed runs more than one process (initialised from ``torchrun``'s environment if
    needed), copy rank 0's weights to every rank and shard with FSDP2 (:func:`shard_model`).

    ``dropout`` defaults to 0 so that runs at different world sizes see the same computation (dropout masks
    depend on how the batch is split). ``distributed=False`` keeps this process alone even inside a
    distributed job (a one-process reference); None decides from the environment.
    """
    from lowbit.nn.lora import LoRASpec, add_lora
    from lowbit.train.prepare import quantize_base

    if distributed is not False:
        init_from_env()
    if device is None:  # new LoRA modules are made on the CPU: bring them to where the model already is
        device = next(model.parameters()).device
    quantize_base(model, quant_method, bits, group_size)
    torch.manual_seed(seed)
    add_lora(model, LoRASpec(r=r, alpha=alpha, dropout=dropout))
    if device is not None:
        model.to(device)
    if _world(distributed)[1] > 1:
        with torch.no_grad():  # adapters are initialised from each rank's RNG: make every rank start alike
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)
        shard_model(model)
    return model


def shard_model(model: nn.Module) -> nn.Module:
    """``fully_shard`` every decoder block, then the root (embeddings, final norm, ``lm_head``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lowbit.model.blocks import find_blocks

    _, world = _world()
    dev = next(model.parameters()).device
    mesh = init_device_mesh(dev.type, (world,))
    for block in find_blocks(model)[1]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@dataclass
class QLoRARun:
    """Per-step losses (mean over ranks) and timing of :func:`train_qlora`."""

    losses: list[float]
    world_size: int
    seconds: float
    step_seconds: list[float] = field(default_factory=list)
    tokens_per_step: int = 0


def train_qlora(model: nn.Module, blocks: torch.Tensor, *, steps: int, batch_size: int, lr: float = 2e-4,
                max_grad_norm: float | None = 0.3, seed: int = 0,
                progress: Callable[[int, float], None] | None = None, distributed: bool | None = None) -> QLoRARun:
    """AdamW on the LoRA factors of a model from :func:`prepare_qlora`; the global batch is split over ranks.

    Args:
        model: from :func:`prepare_qlora` (sharded when world size > 1).
        blocks: ``(n, seq_len)`` token ids, the same on every rank.
        steps: optimizer steps.
        batch_size: global sequences per step; must be a multiple of the world size.
        lr, max_grad_norm: AdamW learning rate and gradient clipping (over all ranks' shards).
        seed: batch order (the same on every rank).
        progress: called as ``progress(step, loss)`` after every step.
        distributed: False trains this process alone (as :func:`prepare_qlora`'s ``distributed=False``).
    """
    from lowbit.nn.lora import lora_parameters

    rank, world = _world(distributed)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 or batch_size % world:
        raise ValueError(f"batch_size must be a positive multiple of the world size {world}, got {batch_size!r}")
    if blocks.dim() != 2:
        raise ValueError(f"blocks must be (n, seq_len) token ids, got shape {tuple(blocks.shape)}")
    params = lora_parameters(model)
    if not params:
        raise ValueError("the model has no LoRA parameters; call prepare_qlora first")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    emb = model.get_input_embeddings().weight  # where the token ids must go (the LoRA list may hold CPU copies)
    dev = emb.to_local().device if hasattr(emb, "to_local") else emb.device
    local = batch_size // world
    g = torch.Generator().manual_seed(seed)
    losses, times = [], []
    model.train()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        ts = time.perf_counter()
        idx = torch.randint(0, blocks.shape[0], (batch_size,), generator=g)
        batch = blocks[idx[rank * local:(rank + 1) * local]].to(dev)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        mean = loss.detach().float().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
        if not torch.isfinite(mean):
            raise FloatingPointError(f"qlora: loss is {losses[-1]} at step {step}; lower lr")
        times.append(time.perf_counter() - ts)
        if progress is not None:
            progress(step, losses[-1])
    model.eval()
    return QLoRARun(losses, world, time.perf_counter() - t0, times, batch_size * blocks.shape[1])


def unsharded_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors by module name, gathered to full tensors on every rank (a collective when sharded)."""
    out = {}
    for name, p in model.named_parameters():
        if ".lora_" in name:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = full.detach().cpu()
    return out
