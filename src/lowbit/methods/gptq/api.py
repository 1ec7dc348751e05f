"""``GPTQConfig``: GPTQ (arXiv 2210.17323) rounding through any lowbit format.

``GPTQConfig(format=IntAffine(bits=4, group_size=128), act_order=True, static_groups=True)`` quantizes each
Linear of a model with the Hessian its inputs give (collected by :mod:`lowbit.calibration.sequential`).
The format decides the grid: ``format.params(W[:, j:j+g])`` fits a group, ``format.fake_quantize(w, **params)``
rounds one column, ``format.quantize(Q, **params, g_idx=...)`` stores the result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, ClassVar, Mapping

import torch

from lowbit.config import ConfigError
from lowbit.formats.affine import IntAffine
from lowbit.formats.base import Format, QuantizedTensor
from lowbit.methods.base import MethodConfig
from lowbit.methods.gptq.core import Params, gptq

__all__ = ["GPTQConfig", "quantize_with_hessian", "require_hessian", "affine_column_rounder"]


def require_hessian(stats: Mapping[str, torch.Tensor] | None, W: torch.Tensor, kind: str) -> torch.Tensor:
    """The ``hessian`` statistic for ``W: (out, in)``, checked; a ``ValueError`` names what is wrong."""
    H = (stats or {}).get("hessian")
    if H is None:
        raise ValueError(f"method {kind!r} needs the 'hessian' statistic; got {sorted(stats or {})} "
                         "(quantize through lowbit.quantize_ with calibration data)")
    n = W.shape[1]
    if tuple(H.shape) != (n, n):
        raise ValueError(f"hessian has shape {tuple(H.shape)}, expected ({n}, {n}) for weight {tuple(W.shape)}")
    return H


def _cat(groups: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if not groups or not groups[0]:
        return {}
    if len(groups) == 1:  # one group (per-channel formats): its params as the format shaped them, e.g. (out,)
        return dict(groups[0])
    return {k: torch.cat([p[k] for p in groups], dim=1) for k in groups[0]}


def affine_column_rounder(qmax: float, scale_zero: Callable[[Params], tuple[torch.Tensor, torch.Tensor]]
                          ) -> Callable[[torch.Tensor, Params], torch.Tensor]:
    """``round_(w, params)`` for one column on an integer grid ``0..qmax``: ``(clamp(round(w/s + z), 0, qmax) - z)·s``
    in float32, with the group's ``(s, z)`` (``(out, 1)`` float32) from ``scale_zero(params)`` computed once per
    group, not per column (the per-column validation and expansion of a format's ``fake_quantize`` dominated
    GPTQ's time on small layers). Keyed by ``id(params)``: the sweep keeps every params dict alive while it
    runs, so ids are not reused, and with act-order + static groups consecutive columns switch groups."""
    cache: dict[int, tuple[Params, torch.Tensor, torch.Tensor]] = {}

    def round_(w: torch.Tensor, p: Params) -> torch.Tensor:
        hit = cache.get(id(p))
        if hit is None or hit[0] is not p:
            hit = cache[id(p)] = (p, *scale_zero(p))
        _, s, z = hit
        q = torch.clamp(torch.round(w.float() / s + z), 0, qmax)
        return ((q - z) * s).to(w.dtype)

    return round_


def _column_rounder(fmt: Format) -> Callable[..., torch.Tensor]:
    """``round_(w, params, j, u_jj)`` for GPTQ's sweep: ``fmt.fake_quantize`` of one column.

    For :class:`IntAffine` the column is rounded by :func:`affine_column_rounder` on the group's parameters,
    which the sweep fitted with ``fmt.params`` (so they need none of ``fake_quantize``'s checks): the same
    arithmetic as ``IntAffine.codes`` + ``fake_quantize``, hence the same values.
    """
    if type(fmt) is not IntAffine:
        return lambda w, p, _j, _d: fmt.fake_quantize(w, **p)
    mid = float(1 << (fmt.bits - 1))

    def scale_zero(p: Params) -> tuple[torch.Tensor, torch.Tensor]:
        zero = p.get("zero_point")
        s = p["scale"].float()
        return s, torch.full_like(s, mid) if zero is None else zero.float()

    rnd = affine_column_rounder(float(fmt.qmax), scale_zero)
    return lambda w, p, _j, _d: rnd(w, p)


def quantize_with_hessian(fmt: Format, W: torch.Tensor, H: torch.Tensor, *, damp: float, block_size: int,
                          act_order: bool, static_groups: bool) -> QuantizedTensor:
    """Run :func:`~lowbit.methods.gptq.core.gptq` with ``fmt``'s grid and store the result in ``fmt``."""
    group_size = getattr(fmt, "group_size", None)
    Q, groups, g_idx, _ = gptq(W.detach(), H.to(W.device), lambda Wg, _u: fmt.params(Wg), _column_rounder(fmt),
                               group_size=group_size, damp=damp, block_size=block_size, act_order=act_order,
                               static_groups=static_groups)
    extra: dict[str, Any] = {} if g_idx is None else {"g_idx": g_idx}
    q = fmt.quantize(Q, **_cat(groups), **extra)
    return q if q.dtype == W.dtype else dataclasses.replace(q, dtype=W.dtype)


@dataclass(frozen=True)
class GPTQConfig(MethodConfig):
    """GPTQ with the reference's options.

    Attributes:
        format: the storage format; its ``group_size`` (if any) is GPTQ's group size.
        damp: dampening as a fraction of ``mean(diag H)`` (reference ``percdamp=0.01``).
        block_size: lazy-batch width ``B`` (reference 128).
        act_order: quantize columns in order of decreasing ``H_ii`` (desc_act); stores ``g_idx`` unless
            ``static_groups``.
        static_groups: fit each group's parameters on the original weight before any update.
    """

    kind: ClassVar[str] = "gptq"
    stats: ClassVar[tuple[str, ...]] = ("hessian",)
    summary: ClassVar[str] = "GPTQ: second-order error feedback column by column (act-order, static groups)"
    paper: ClassVar[str] = "arXiv:2210.17323"

    format: Format
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.format, Format):
            raise TypeError(f"GPTQConfig.format must be a lowbit Format (e.g. IntAffine), got {type(self.format).__name__}")
        if not (isinstance(self.damp, (int, float)) and self.damp > 0):
            raise ConfigError(f"damp must be a positive fraction of mean(diag H), got {self.damp!r} (reference: 0.01)")
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ConfigError(f"block_size must be a positive int, got {self.block_size!r} (reference: 128)")
        if self.static_groups and not getattr(self.format, "group_size", None):
            raise ConfigError("static_groups=True needs a format with a group_size; "
                              f"{self.format.kind} has group_size={getattr(self.format, 'group_size', None)!r}")

    def quantize_weight(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor] | None = None) -> QuantizedTensor:
        H = require_hessian(stats, W, self.kind)
        return quantize_with_hessian(self.format, W, H, damp=self.damp, block_size=self.block_size,
                                     act_order=self.act_order, static_groups=self.static_groups)

    @classmethod
    def for_bits(cls, bits: int, group_size: int | None = 128, **options: Any) -> "GPTQConfig":
        """GPTQ into ``IntAffine(bits, group_size or 128)`` (asymmetric unless ``symmetric=True``).

        For per-channel GPTQ build the config directly: ``GPTQConfig(format=IntAffine(bits, group_size=None))``.
        """
        cls.check_bits(bits)
        group_size = group_size or 128
        symmetric = bool(options.pop("symmetric", False))
        return cls(format=IntAffine(bits=bits, group_size=group_size, symmetric=symmetric), **options)
