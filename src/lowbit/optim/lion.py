"""Lion (Chen et al., arXiv 2302.06675) with 32-bit, 8-bit or 4-bit block-wise quantized momentum."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lowbit.optim.base import QuantStateOptimizer, check_hyper
from lowbit.optim.core import lion_rule

__all__ = ["Lion", "Lion4bit", "Lion8bit", "PagedLion", "PagedLion8bit"]


class Lion(QuantStateOptimizer):
    """Lion: sign update with decoupled weight decay; one signed state (momentum, signed dynamic map).

    Args:
        params: parameters or param groups (a group may set ``optim_bits``, ``block_size``, ``min_8bit_size``).
        lr: η (Lion wants 3-10x smaller than AdamW). betas: (β1, β2) in [0, 1). weight_decay: λ (decoupled).
        optim_bits: 32, 8 or 4. block_size: 256 default. min_8bit_size: smaller params keep fp32 state.
        paged: keep state in pinned CPU memory between steps on CUDA.
    """

    slots = (("exp_avg", True),)
    _default_bits = 32
    _default_paged = False

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, optim_bits: int | None = None, block_size: int = 256,
                 min_8bit_size: int = 4096, paged: bool | None = None) -> None:
        check_hyper("lr", lr, 0.0)
        check_hyper("betas[0]", betas[0], 0.0, 1.0, open_high=True)
        check_hyper("betas[1]", betas[1], 0.0, 1.0, open_high=True)
        check_hyper("weight_decay", weight_decay, 0.0)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay},
                         optim_bits=self._default_bits if optim_bits is None else optim_bits,
                         block_size=block_size, min_8bit_size=min_8bit_size,
                         paged=self._default_paged if paged is None else paged)

    def _update(self, param: torch.Tensor, grad: torch.Tensor, states: list[torch.Tensor],
                group: dict[str, Any], step: int) -> None:
        (m,) = states
        lion_rule(param, grad, m, lr=group["lr"], β1=group["betas"][0], β2=group["betas"][1],
                  λ=group["weight_decay"])


class Lion8bit(Lion):
    """:class:`Lion` with 8-bit state by default."""

    _default_bits = 8


class Lion4bit(Lion):
    """:class:`Lion` with 4-bit state by default."""

    _default_bits = 4


class PagedLion(Lion):
    """:class:`Lion`, 32-bit state paged to CPU memory between steps on CUDA."""

    _default_paged = True


class PagedLion8bit(Lion8bit):
    """:class:`Lion8bit`, state paged to CPU memory between steps on CUDA."""

    _default_paged = True
