"""SGD with momentum, momentum buffer in 32, 8 or 4 bits (block-wise, signed dynamic map; arXiv 2110.02861)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lowbit.optim.base import QuantStateOptimizer, check_hyper
from lowbit.optim.core import sgd_rule

__all__ = ["SGD", "SGD4bit", "SGD8bit"]


class SGD(QuantStateOptimizer):
    """SGD as torch.optim.SGD (momentum, dampening, weight_decay, nesterov) with a quantizable buffer.

    Args:
        params: parameters or param groups (a group may set ``optim_bits``, ``block_size``, ``min_8bit_size``).
        lr: η. momentum: β1 in [0, 1); 0 means no state. dampening: in [0, 1]. weight_decay: λ (L2).
        nesterov: Nesterov momentum (needs momentum > 0 and dampening = 0).
        optim_bits: 32, 8 or 4. block_size: 256 default. min_8bit_size: smaller params keep fp32 state.
        paged: keep state in pinned CPU memory between steps on CUDA.
    """

    slots = (("momentum_buffer", True),)
    _default_bits = 32

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, optim_bits: int | None = None,
                 block_size: int = 256, min_8bit_size: int = 4096, paged: bool = False) -> None:
        check_hyper("lr", lr, 0.0)
        check_hyper("momentum", momentum, 0.0, 1.0, open_high=True)
        check_hyper("dampening", dampening, 0.0, 1.0)
        check_hyper("weight_decay", weight_decay, 0.0)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"nesterov=True needs momentum > 0 and dampening = 0 (got momentum={momentum!r}, "
                             f"dampening={dampening!r})")
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": dampening,
                                  "weight_decay": weight_decay, "nesterov": nesterov},
                         optim_bits=self._default_bits if optim_bits is None else optim_bits,
                         block_size=block_size, min_8bit_size=min_8bit_size, paged=paged)

    def _active_slots(self, group: dict[str, Any]) -> tuple[tuple[str, bool], ...]:
        return self.slots if group["momentum"] > 0 else ()

    def _update(self, param: torch.Tensor, grad: torch.Tensor, states: list[torch.Tensor],
                group: dict[str, Any], step: int) -> None:
        sgd_rule(param, grad, states[0] if states else None, t=step, lr=group["lr"], β1=group["momentum"],
                 dampening=group["dampening"], λ=group["weight_decay"], nesterov=group["nesterov"])


class SGD8bit(SGD):
    """:class:`SGD` with an 8-bit momentum buffer by default."""

    _default_bits = 8


class SGD4bit(SGD):
    """:class:`SGD` with a 4-bit momentum buffer by default."""

    _default_bits = 4
