"""``AWQConfig``: AWQ (arXiv 2306.00978) scaling and clipping, then rounding by the format or another method.

Per decoder block (through :mod:`lowbit.calibration.sequential`'s ``prepare_block`` hook, block inputs from
the float path as llm-awq does): for each smooth → balance pair of :mod:`lowbit.model.mappings`

1. capture the inputs of the inspected sub-module (``self_attn`` for q/k/v, ``mlp`` for gate/up, the layer
   itself for o_proj/down_proj) and its float output;
2. grid-search ``α`` (20 points) minimising the sub-module's output error with the balance layers replaced
   by ``Q(W·s)/s`` (:func:`lowbit.methods.awq.core.search_scale`); optional duo scaling;
3. fold ``s`` into the smooth layer and the balance layers (:func:`lowbit.model.mappings.fold_scale`);

then clip every target Linear except q/k (:func:`lowbit.methods.awq.core.search_clip`). Cost: the searches
round grouped ``IntAffine`` weights on a group view (:func:`fake_quantizer`, bit-identical to the format's
``fake_quantize``), a lone Linear's α loss uses its input Gram matrix when that is cheaper, and
``search_samples`` runs the α search on fewer calibration samples (see :class:`AWQConfig`). The runner then rounds
each layer with ``format`` (round to nearest) or with ``then`` (``GPTQConfig``, ``HQQConfig``, ... over the same
format).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from lowbit.config import ConfigError
from lowbit.formats.affine import IntAffine
from lowbit.formats.base import Format, QuantizedTensor
from lowbit.methods.awq.core import search_clip, search_scale, weight_group_mean
from lowbit.methods.base import MethodConfig
from lowbit.model.mappings import ResolvedMapping, fold_scale, resolve

__all__ = ["AWQConfig", "awq_block"]

log = logging.getLogger(__name__)

NO_CLIP = r"(^|\.)(q_|k_|query|key|Wqkv)"
"""Layers left unclipped (llm-awq: clipping q/k hurts attention scores)."""


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class _Capture:
    """Forward pre-hooks recording the call arguments of inspected modules and the inputs of Linears."""

    def __init__(self, inspect: dict[str, nn.Module], linears: dict[str, nn.Module]) -> None:
        self.calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {n: [] for n in inspect}
        self.inputs: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        self._handles = [m.register_forward_pre_hook(self._call_hook(n), with_kwargs=True) for n, m in inspect.items()]
        self._handles += [m.register_forward_pre_hook(self._input_hook(n)) for n, m in linears.items()]

    def _call_hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.calls[name].append((args, dict(kwargs)))
        return hook

    def _input_hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            self.inputs[name].append(x.detach().reshape(-1, x.shape[-1]))
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _first_samples(obj: Any, k: int, batch: int) -> Any:
    """``obj`` (nested tuples/lists/dicts of tensors) with every tensor whose first dim is ``batch`` cut to ``k``."""
    if isinstance(obj, torch.Tensor):
        return obj[:k] if obj.dim() and obj.shape[0] == batch and batch > k else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_first_samples(o, k, batch) for o in obj)
    if isinstance(obj, dict):
        return {key: _first_samples(v, k, batch) for key, v in obj.items()}
    return obj


def _subsample(calls: list[tuple[tuple[Any, ...], dict[str, Any]]], n_samples: int | None
               ) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The first ``n_samples`` calibration samples of the captured sub-module calls (all when None)."""
    if n_samples is None:
        return calls
    out, left = [], n_samples
    for args, kwargs in calls:
        if left <= 0:
            break
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        b = x.shape[0] if x.dim() == 3 else 1
        out.append(_first_samples((args, kwargs), left, b))
        left -= b
    return out


def fake_quantizer(fmt: Format) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fmt.fake_quantize`` for AWQ's searches (tens of calls per layer on unchanged shapes).

    For a grouped :class:`IntAffine` (no ``per_tensor``/``act_order``) the parameters still come from
    ``fmt.params`` (the format's one definition of scale and zero point); the rounding
    ``clamp(round(W/s + z), 0, qmax)``, then ``(q - z)·s`` in float32, is applied on a ``(C_o, n_groups, g)``
    view with broadcast parameters instead of gathering them per column: the same arithmetic as
    ``IntAffine.fake_quantize``, bit for bit (tested), ~3x faster. Other formats: ``fmt.fake_quantize``.
    """
    if type(fmt) is not IntAffine or fmt.per_tensor or fmt.act_order:
        return fmt.fake_quantize
    qmax = float(fmt.qmax)

    def fq(W: torch.Tensor) -> torch.Tensor:
        p = fmt.params(W)
        C_o, C_i = W.shape
        s = p["scale"].float().unsqueeze(2)
        zp = p.get("zero_point")
        z = torch.full_like(s, float(1 << (fmt.bits - 1))) if zp is None else zp.float().unsqueeze(2)
        ng, g = s.shape[1], fmt.group_size or C_i
        Wg = torch.nn.functional.pad(W.float(), (0, ng * g - C_i)).view(C_o, ng, g)
        q = torch.clamp(torch.round(Wg / s + z), 0, qmax)
        return ((q - z) * s).view(C_o, ng * g)[:, :C_i].to(W.dtype)

    return fq


def _inspect_loss(m: ResolvedMapping, calls: list[tuple[tuple[Any, ...], dict[str, Any]]], ref: list[torch.Tensor],
                  fake_quant: Any, s: torch.Tensor, saved: list[torch.Tensor]) -> float:
    """``L(s)``: mean squared error of the inspected module's output with the balance weights ``Q(W·s)/s``
    (``saved`` holds the original weights; they are restored before returning)."""
    try:
        with torch.no_grad():
            for fc, W in zip(m.balance, saved):
                sW = s.to(W.dtype).view(1, -1)
                fc.weight.copy_(fake_quant(W * sW) / sW)
            err, n = 0.0, 0
            for (args, kwargs), y in zip(calls, ref):
                d = _first(m.inspect(*args, **kwargs)).to(torch.float32) - y
                err += float(d.pow(2).sum())
                n += d.numel()
    finally:
        with torch.no_grad():
            for fc, W in zip(m.balance, saved):
                fc.weight.copy_(W)
    return err / max(n, 1)


def _gram_loss(W: torch.Tensor, H: torch.Tensor, fake_quant: Any, s: torch.Tensor) -> float:
    """``L(s)`` of a lone Linear from its input Gram matrix ``H = XᵀX / T``: with ``D = Q(W·s)/s - W``,
    ``mean_{t,o} (X Dᵀ)² = tr(D H Dᵀ) / C_o`` (bias cancels)."""
    sW = s.to(W.dtype).view(1, -1)
    D = (fake_quant(W * sW) / sW).to(H.dtype) - W.to(H.dtype)
    return float(((D @ H) * D).sum()) / W.shape[0]


def _gram_is_cheaper(tokens: int, c_in: int, c_out: int, n_grid: int) -> bool:
    """Multiply-adds: ``T·C_i²`` once + ``n·C_o·C_i²`` (Gram form) against ``n·T·C_i·C_o`` (module calls)."""
    return tokens * c_in * c_in + n_grid * c_out * c_in * c_in < n_grid * tokens * c_in * c_out


def _scale_loss(m: ResolvedMapping, calls: list[tuple[tuple[Any, ...], dict[str, Any]]], fake_quant: Any,
                n_grid: int) -> Any:
    """``L(s)`` for mapping ``m`` on the captured ``calls`` of its inspected module.

    When the inspected module is the lone balance Linear (``down_proj`` after ``up_proj``) and there are more
    tokens than make a Gram matrix worthwhile, the loss is the exact quadratic form :func:`_gram_loss`;
    otherwise the module is called on the calls with the balance weights replaced (:func:`_inspect_loss`).
    """
    fc = m.balance[0]
    if len(m.balance) == 1 and m.inspect is fc and isinstance(fc, nn.Linear):
        X = torch.cat([(a[0] if a else k["input"]).reshape(-1, fc.in_features) for a, k in calls])
        if _gram_is_cheaper(X.shape[0], fc.in_features, fc.out_features, n_grid):
            Xf = X.to(torch.float64 if fc.weight.dtype == torch.float64 else torch.float32)
            H = Xf.T @ Xf / max(Xf.shape[0], 1)
            W = fc.weight.detach()
            return lambda s: _gram_loss(W, H, fake_quant, s)
    with torch.no_grad():
        ref = [_first(m.inspect(*a, **k)).to(torch.float32) for a, k in calls]
    saved = [b.weight.detach().clone() for b in m.balance]
    return lambda s: _inspect_loss(m, calls, ref, fake_quant, s, saved)


def awq_block(block: nn.Module, calls: list[Any], x_mean: Mapping[str, torch.Tensor], fmt: Format, *,
              n_grid: int = 20, duo_scaling: bool = False, clip: bool = True, max_clip_tokens: int = 512,
              search_samples: int | None = None, only: set[str] | None = None) -> dict[str, float]:
    """Apply AWQ's scale search and clipping to one block in place; returns ``{smooth layer: α*}``.

    Args:
        block: a decoder block with a row in :data:`lowbit.model.mappings.MAPPINGS`.
        calls: the block's calibration calls (``.args``, ``.kwargs``), as the runner captures them.
        x_mean: ``mean|X|`` per input channel, keyed by Linear names relative to the block.
        fmt: the weight format whose fake-quantize the searches use.
        only: the Linear layers being quantized (mappings and clipping touch only those).
        search_samples: calibration samples the α search's loss uses (None: all, as llm-awq); the statistics
            ``x_mean`` always come from all of them.
    """
    maps = [m for m in resolve(block, only=only) if m.balance_names[0] in x_mean]
    linears = {n: mod for n, mod in block.named_modules() if isinstance(mod, nn.Linear)
               and (only is None or n in only)}
    cap = _Capture({m.inspect_name: m.inspect for m in maps}, linears if clip else {})
    try:
        with torch.no_grad():
            for c in calls:
                block(*c.args, **c.kwargs)
    finally:
        cap.remove()
    group_size = getattr(fmt, "group_size", None)
    fq = fake_quantizer(fmt)
    alphas: dict[str, float] = {}
    inputs = {n: torch.cat(v) for n, v in cap.inputs.items() if v}
    for m in maps:
        insp_calls = _subsample(cap.calls[m.inspect_name], search_samples)
        w_mean = weight_group_mean([fc.weight for fc in m.balance], group_size) if duo_scaling else None
        with torch.no_grad():
            loss = _scale_loss(m, insp_calls, fq, n_grid)
            s, alpha, _ = search_scale(loss, x_mean[m.balance_names[0]], n_grid=n_grid, w_mean=w_mean)
        fold_scale(m.smooth, m.balance, s)
        for n in m.balance_names:
            if n in inputs:
                inputs[n] = inputs[n] / s.to(inputs[n].dtype)
        alphas[m.smooth_name] = alpha
    if clip:
        for n, fc in linears.items():
            if re.search(NO_CLIP, n) or n not in inputs:
                continue
            X = inputs[n]
            X = X[:: max(1, X.shape[0] // max_clip_tokens)][:max_clip_tokens]
            with torch.no_grad():
                W = fc.weight.detach()
                mv = search_clip(W, X, fq, group_size, n_grid=20, max_shrink=0.5)
                g = group_size or W.shape[1]
                lim = mv.repeat_interleave(g, dim=1)[:, :W.shape[1]].to(W.dtype)
                fc.weight.copy_(torch.maximum(torch.minimum(W, lim), -lim))
    return alphas


@dataclass(frozen=True)
class AWQConfig(MethodConfig):
    """AWQ over any weight format.

    Attributes:
        format: the storage format (``IntAffine(bits=4, group_size=128)`` for the paper's setting).
        then: a method that rounds the scaled weights instead of round-to-nearest (e.g. ``GPTQConfig`` or
            ``HQQConfig`` with the same format); None for RTN through ``format``.
        duo_scaling: ``s = s_X^α / s_W^(1-α)`` (AutoAWQ / llm-compressor default) instead of ``s_X^α`` (llm-awq).
        n_grid: α grid points (20).
        clip: run the clipping search.
        max_clip_tokens: input tokens the clipping search uses per layer (llm-awq: 512).
        search_samples: calibration samples in the α search's loss (None: all, as llm-awq does); fewer make the
            search cheaper on a CPU: 4 of 16 samples took 0.31x the time with no loss in held-out error on the
            default model's first blocks (results/awq_speed.md). The ``mean|X|`` statistics and the clipping
            search use all samples either way. ``quick_options`` (``lowbit demo``): 2 search samples.
    """

    kind: ClassVar[str] = "awq"
    stats: ClassVar[tuple[str, ...]] = ("act_mean_abs",)
    sequential_inputs: ClassVar[str] = "fp"
    summary: ClassVar[str] = "AWQ: activation-aware channel scaling (20-point alpha search) + clipping, then any rounding"
    paper: ClassVar[str] = "arXiv:2306.00978"
    quick_options: ClassVar[Mapping[str, Any]] = {"search_samples": 2}

    format: Format
    then: MethodConfig | None = None
    duo_scaling: bool = False
    n_grid: int = 20
    clip: bool = True
    max_clip_tokens: int = 512
    search_samples: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.format, Format):
            raise TypeError(f"AWQConfig.format must be a lowbit Format (e.g. IntAffine), got {type(self.format).__name__}")
        if self.then is not None:
            if not isinstance(self.then, MethodConfig) or isinstance(self.then, AWQConfig):
                raise ConfigError(f"AWQConfig.then must be another method config (e.g. GPTQConfig), got {self.then!r}")
            if self.then.format != self.format:
                raise ConfigError(f"AWQConfig.then stores with {self.then.format!r} but format={self.format!r}; "
                                  "give both the same format")
            object.__setattr__(self, "stats", tuple(dict.fromkeys(("act_mean_abs", *self.then.stats))))
        if self.search_samples is not None and (not isinstance(self.search_samples, int) or self.search_samples < 1):
            raise ConfigError(f"search_samples={self.search_samples!r} must be a positive int or None (all)")
        if not isinstance(self.n_grid, int) or self.n_grid < 1:
            raise ConfigError(f"n_grid={self.n_grid!r} must be a positive int (reference: 20)")

    def prepare_block(self, block: nn.Module, calls: list[Any],
                      stats_by_layer: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Runner hook: scale search, fold and clip on this block (see :func:`awq_block`)."""
        x_mean = {n: st["act_mean_abs"] for n, st in stats_by_layer.items() if "act_mean_abs" in st}
        alphas = awq_block(block, calls, x_mean, self.format, n_grid=self.n_grid, duo_scaling=self.duo_scaling,
                           clip=self.clip, max_clip_tokens=self.max_clip_tokens,
                           search_samples=self.search_samples, only=set(stats_by_layer))
        log.debug("awq: alphas %s", alphas)

    def quantize_weight(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor] | None = None) -> QuantizedTensor:
        if self.then is not None:
            return self.then.quantize_weight(W, stats)
        return self.format.quantize(W)

    @classmethod
    def for_bits(cls, bits: int, group_size: int | None = 128, **options: Any) -> "AWQConfig":
        """AWQ into asymmetric ``IntAffine(bits, group_size)`` (group 128 by default). Options: ``duo_scaling``,
        ``clip``, ``n_grid``, ``then`` (``"gptq"`` or a method kind whose ``for_bits`` gives the same format)."""
        from lowbit.formats.affine import IntAffine
        from lowbit.methods.base import get_method

        cls.check_bits(bits)
        group_size = 128 if group_size is None else group_size
        then = options.pop("then", None)
        fmt = IntAffine(bits=bits, group_size=group_size)
        then_cfg = None
        if isinstance(then, str):
            then_cfg = get_method(then).for_bits(bits, group_size)
            if then_cfg.format != fmt:
                fmt = then_cfg.format
        elif then is not None:
            then_cfg = then
            fmt = then.format
        known = {"duo_scaling", "clip", "n_grid", "max_clip_tokens", "search_samples"}
        if set(options) - known:
            raise ConfigError(f"unknown awq option(s) {sorted(set(options) - known)}; valid: {sorted(known | {'then'})}")
        return cls(format=fmt, then=then_cfg, **options)

    def describe(self) -> str:
        rounder = self.then.kind if self.then is not None else "rtn"
        f = self.format
        layout = f"int{f.bits} g{f.group_size}" if isinstance(f, IntAffine) else f.kind
        search = "" if self.search_samples is None else f", alpha search on {self.search_samples} samples"
        return (f"awq({layout}, {rounder}{', duo' if self.duo_scaling else ''}{'' if self.clip else ', no clip'}"
                f"{search})")
