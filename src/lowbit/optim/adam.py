"""Adam and AdamW with 32-bit, 8-bit or 4-bit block-wise quantized state (arXiv 2110.02861, 1711.05101).

``Adam`` adds weight decay to the gradient (L2, as torch.optim.Adam); ``AdamW`` decays the weights
(decoupled, as torch.optim.AdamW). Note: bitsandbytes' ``Adam8bit`` applies *decoupled* decay for any
``weight_decay``; ours follows torch's meaning of each name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lowbit.optim.base import QuantStateOptimizer, check_hyper
from lowbit.optim.blockwise import state_codebook
from lowbit.optim.core import adam_rule

__all__ = ["Adam", "Adam4bit", "Adam8bit", "AdamW", "AdamW4bit", "AdamW8bit", "PagedAdam", "PagedAdam8bit",
           "PagedAdamW", "PagedAdamW4bit", "PagedAdamW8bit"]


class Adam(QuantStateOptimizer):
    """Adam with block-wise quantized moments: m signed dynamic map, v unsigned (see :mod:`.blockwise`).

    Args:
        params: parameters or param groups (a group may set ``optim_bits``, ``block_size``, ``min_8bit_size``).
        lr: learning rate η.
        betas: (β1, β2), each in [0, 1).
        eps: ε added to the denominator.
        weight_decay: λ.
        amsgrad: not supported (only False).
        optim_bits: 32, 8 or 4. block_size: 256 (default) … 2048. min_8bit_size: smaller params keep fp32 state.
        paged: keep state in pinned CPU memory between steps on CUDA.
    """

    slots = (("exp_avg", True), ("exp_avg_sq", False))
    _decoupled = False
    _default_bits = 32
    _default_paged = False

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 optim_bits: int | None = None, block_size: int = 256, min_8bit_size: int = 4096,
                 paged: bool | None = None) -> None:
        if amsgrad:
            raise ValueError(f"amsgrad={amsgrad!r} is not supported; valid: False")
        check_hyper("lr", lr, 0.0)
        check_hyper("betas[0]", betas[0], 0.0, 1.0, open_high=True)
        check_hyper("betas[1]", betas[1], 0.0, 1.0, open_high=True)
        check_hyper("eps", eps, 0.0)
        check_hyper("weight_decay", weight_decay, 0.0)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay},
                         optim_bits=self._default_bits if optim_bits is None else optim_bits,
                         block_size=block_size, min_8bit_size=min_8bit_size,
                         paged=self._default_paged if paged is None else paged)

    def _fused_step(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                    paged: bool) -> bool:
        """AdamW with 8-bit state on CUDA: ``lowbit::adamw8bit_step_`` (the Triton kernel: one pass over θ, g and
        the codes) instead of dequantize, step, requantize; the op's reference is this class's own step."""
        if not (self._decoupled and state["bits"] == 8 and not paged and p.is_cuda and p.dtype == torch.float32
                and p.is_contiguous() and grad.is_contiguous() and grad.device == p.device):
            return False
        import lowbit.ops.schema  # noqa: F401  (defines torch.ops.lowbit.*)
        from lowbit.ops import triton as lowbit_triton

        if not lowbit_triton.register_if_available():
            return False
        state["step"] += 1
        b1, b2 = group["betas"]
        torch.ops.lowbit.adamw8bit_step_(
            p.data, grad, state["exp_avg.qdata"], state["exp_avg.absmax"], state["exp_avg_sq.qdata"],
            state["exp_avg_sq.absmax"], state_codebook(8, True, p.device), state_codebook(8, False, p.device),
            state["step"], group["lr"], b1, b2, group["eps"], group["weight_decay"], state["block_size"])
        return True

    def _update(self, param: torch.Tensor, grad: torch.Tensor, states: list[torch.Tensor],
                group: dict[str, Any], step: int) -> None:
        m, v = states
        adam_rule(param, grad, m, v, t=step, lr=group["lr"], β1=group["betas"][0], β2=group["betas"][1],
                  ε=group["eps"], λ=group["weight_decay"], decoupled=self._decoupled)


class AdamW(Adam):
    """Adam with decoupled weight decay (arXiv 1711.05101); default ``weight_decay=1e-2`` as torch."""

    _decoupled = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, **kwargs: Any) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)


class Adam8bit(Adam):
    """:class:`Adam` with 8-bit state by default."""

    _default_bits = 8


class Adam4bit(Adam):
    """:class:`Adam` with 4-bit state by default."""

    _default_bits = 4


class AdamW8bit(AdamW):
    """:class:`AdamW` with 8-bit state by default."""

    _default_bits = 8


class AdamW4bit(AdamW):
    """:class:`AdamW` with 4-bit state by default."""

    _default_bits = 4


class PagedAdam(Adam):
    """:class:`Adam`, 32-bit state paged to CPU memory between steps on CUDA."""

    _default_paged = True


class PagedAdam8bit(Adam8bit):
    """:class:`Adam8bit`, state paged to CPU memory between steps on CUDA."""

    _default_paged = True


class PagedAdamW(AdamW):
    """:class:`AdamW`, 32-bit state paged to CPU memory between steps on CUDA."""

    _default_paged = True


class PagedAdamW8bit(AdamW8bit):
    """:class:`AdamW8bit`, state paged to CPU memory between steps on CUDA."""

    _default_paged = True


class PagedAdamW4bit(AdamW4bit):
    """:class:`AdamW4bit`, state paged to CPU memory between steps on CUDA."""

    _default_paged = True
