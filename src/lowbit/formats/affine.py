"""Integer affine (uniform) quantization: ``W ≈ (q - zero_point) · scale`` per group of input columns.

Stored tensors (vocabulary of :mod:`lowbit.formats.base`):

- ``qdata``: ``uint8 (out, ceil(in·bits/8))``, codes ``q ∈ [0, 2^bits)`` bit-packed per row
  (:mod:`lowbit.formats.bitpack`, MSB first).
- ``scale``: ``(out, n_groups)`` in ``scale_dtype`` (fp16 default); ``(1, 1)`` when ``per_tensor``.
- ``zero_point``: same shape as ``scale``; ``uint8`` integer codes by default, ``scale_dtype`` floats with
  ``float_zero_point=True`` (HQQ, QA-LoRA). Absent when ``symmetric`` (the zero point is ``2^(bits-1)``).
- ``g_idx``: ``int32 (in,)``, the group of each input column (GPTQ act-order); only with ``act_order``.

Groups run along the input dimension: column ``j`` belongs to group ``j // group_size`` (or ``g_idx[j]``);
when ``group_size`` does not divide ``in_features`` the last group is shorter. ``group_size=None`` is one
group per output channel.

Round-to-nearest parameters (:meth:`IntAffine.params`):

- asymmetric, integer zero point: the range ``[min(w_min, 0), max(w_max, 0)]`` (zero stays exactly
  representable, as in GPTQ's quantizer), ``scale = range / (2^bits - 1)``, ``zero_point = round(-min/scale)``;
- asymmetric, float zero point: ``[w_min, w_max]`` and ``zero_point = -w_min/scale`` (HQQ's init);
- symmetric: ``scale = 2·absmax / (2^bits - 1)``, implicit ``zero_point = 2^(bits-1)`` (GPTQ's convention,
  which uses every code).

The scale is rounded *up* to ``scale_dtype`` so that the stored grid still covers the range and the
round-to-nearest error stays within half a step of the stored scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowbit.formats.base import Format, QuantizedTensor, check_weight
from lowbit.formats.bitpack import pack, packed_len, unpack

__all__ = ["IntAffine", "round_up_to_dtype", "group_index"]


def round_up_to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast positive ``x`` to ``dtype`` rounding up (never down) and never to zero."""
    x = x.float()
    y = x.to(dtype)
    low = y.float() < x
    if bool(low.any()):
        # next representable value up: for non-negative floats, the bit pattern plus one (works for every
        # float dtype on every device, unlike nextafter for half types)
        ibits = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[dtype]
        y = torch.where(low, (y.view(ibits) + 1).view(dtype), y)
    smallest_subnormal = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    y = torch.where(y > 0, y, torch.full_like(y, smallest_subnormal))
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"a scale of {float(x.max()):.3g} overflows {dtype}; use scale_dtype=torch.float32")
    return y


def group_index(in_features: int, group_size: int | None, device: torch.device | None = None) -> torch.Tensor:
    """Group of each input column, ``(in_features,)`` int64: ``j // group_size`` (all zero if None)."""
    j = torch.arange(in_features, device=device)
    return torch.zeros_like(j) if group_size is None else j // group_size


@dataclass(frozen=True)
class IntAffine(Format):
    """Integer ``bits``-bit affine format with per-group (or per-channel, per-tensor) scale and zero point.

    Args:
        bits: code width, 2..8.
        group_size: input columns per group; ``None`` = one group per output channel.
        symmetric: no stored zero point (implicit ``2^(bits-1)``).
        per_tensor: one scale (and zero point) for the whole tensor; overrides ``group_size``.
        float_zero_point: store the zero point as a float in ``scale_dtype`` (HQQ, QA-LoRA) instead of
            integer codes.
        act_order: also store ``g_idx`` (GPTQ's act-order group index per input column).
        scale_dtype: dtype of stored scales (and float zero points).
    """

    kind = "int_affine"

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    per_tensor: bool = False
    float_zero_point: bool = False
    act_order: bool = False
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"IntAffine bits must be an int in 2..8, got {self.bits!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size <= 0):
            raise ValueError(f"group_size must be a positive int or None (per output channel), got {self.group_size!r}")
        if self.symmetric and self.float_zero_point:
            raise ValueError("symmetric=True stores no zero point; float_zero_point=True contradicts it")
        if self.scale_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"scale_dtype must be float16, bfloat16 or float32, got {self.scale_dtype}")

    # -- layout -----------------------------------------------------------------------------
    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def n_groups(self, in_features: int) -> int:
        if self.per_tensor or self.group_size is None:
            return 1
        return -(-in_features // self.group_size)

    def tensor_names(self) -> tuple[str, ...]:
        names = ["qdata", "scale"]
        if not self.symmetric:
            names.append("zero_point")
        if self.act_order:
            names.append("g_idx")
        return tuple(names)

    def validate_shape(self, shape: tuple[int, int]) -> None:
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"IntAffine stores 2-D weights with positive sizes, got shape {tuple(shape)}")

    def _groups_of(self, in_features: int, device: torch.device, g_idx: torch.Tensor | None) -> torch.Tensor:
        if self.per_tensor:
            return torch.zeros(in_features, dtype=torch.long, device=device)
        if g_idx is not None:
            return g_idx.to(device=device, dtype=torch.long)
        return group_index(in_features, self.group_size, device)

    # -- parameters -------------------------------------------------------------------------
    def params(self, W: torch.Tensor) -> dict[str, torch.Tensor]:
        """RTN parameters for ``W: (out, in)``: ``scale`` and (unless symmetric) ``zero_point``.

        Shapes ``(out, n_groups)``, or ``(1, 1)`` when ``per_tensor``. A ``W`` narrower than one group gets
        one group.
        """
        check_weight(W)
        Wf = W.float()
        out, n = Wf.shape
        if self.per_tensor:
            lo, hi = Wf.min().reshape(1, 1), Wf.max().reshape(1, 1)
        else:
            ng = self.n_groups(n)
            gs = n if self.group_size is None else self.group_size
            pad = ng * gs - n
            if pad:
                # Pad with a copy of the group's first value so min/max of the short group are unchanged.
                last = Wf[:, (ng - 1) * gs: (ng - 1) * gs + 1].expand(out, pad)
                Wf = torch.cat([Wf, last], dim=1)
            G = Wf.reshape(out, ng, gs)
            lo, hi = G.amin(-1), G.amax(-1)
        if self.symmetric:
            absmax = torch.maximum(lo.abs(), hi.abs())
            raw = torch.where(absmax > 0, 2 * absmax / self.qmax, torch.ones_like(absmax))
            return {"scale": round_up_to_dtype(raw, self.scale_dtype)}
        if not self.float_zero_point:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        rng = hi - lo
        raw = torch.where(rng > 0, rng / self.qmax, torch.ones_like(rng))
        scale = round_up_to_dtype(raw, self.scale_dtype)
        z = -lo / scale.float()
        if self.float_zero_point:
            return {"scale": scale, "zero_point": z.to(self.scale_dtype)}
        return {"scale": scale, "zero_point": z.round().clamp(0, self.qmax).to(torch.uint8)}

    def _check_params(self, W: torch.Tensor, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                               torch.Tensor | None]:
        allowed = set(self.tensor_names()) - {"qdata"} | {"g_idx"}
        unknown = set(params) - allowed
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)} for {self.kind}; valid: {sorted(allowed)}")
        out, n = W.shape
        g_idx = params.get("g_idx")
        if g_idx is not None:
            if self.per_tensor:
                raise ValueError("g_idx (act-order groups) cannot be combined with per_tensor=True")
            if g_idx.shape != (n,):
                raise ValueError(f"g_idx must have shape (in_features,) = ({n},), got {tuple(g_idx.shape)}")
            if g_idx.dtype.is_floating_point or int(g_idx.min()) < 0:
                raise ValueError("g_idx must hold non-negative integer group indices")
        scale = params.get("scale")
        zero = params.get("zero_point")
        if self.symmetric and zero is not None:
            raise ValueError("symmetric IntAffine takes no zero_point")
        if not self.symmetric and (scale is None) != (zero is None):
            raise ValueError(f"give both scale and zero_point (or neither) for {self}")
        if scale is None:
            if g_idx is not None:
                raise ValueError("g_idx needs explicit scale and zero_point (one column per group)")
            p = self.params(W)
            return p["scale"], p.get("zero_point"), None
        rows = 1 if self.per_tensor else out
        ng = int(g_idx.max()) + 1 if g_idx is not None else self.n_groups(n)
        if scale.dim() != 2 or scale.shape[0] != rows or (scale.shape[1] != ng and g_idx is None) \
                or (g_idx is not None and scale.shape[1] < ng):
            raise ValueError(f"scale must have shape ({rows}, {ng}) for a weight of shape {tuple(W.shape)}, "
                             f"got {tuple(scale.shape)}")
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise ValueError("scale must be finite and positive")
        scale = scale.to(self.scale_dtype)
        if not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
            raise ValueError(f"a given scale does not fit {self.scale_dtype} (underflow to 0 or overflow); "
                             "use scale_dtype=torch.float32")
        if zero is not None:
            if zero.shape != scale.shape:
                raise ValueError(f"zero_point must have the shape of scale {tuple(scale.shape)}, got {tuple(zero.shape)}")
            if self.float_zero_point:
                zero = zero.to(self.scale_dtype)
            else:
                zr = zero.float().round()
                if int(zr.min()) < 0 or int(zr.max()) > self.qmax:
                    raise ValueError(f"integer zero_point must lie in [0, {self.qmax}] for bits={self.bits}")
                zero = zr.to(torch.uint8)
        return scale, zero, g_idx

    def _expand(self, t: torch.Tensor, groups: torch.Tensor, out: int) -> torch.Tensor:
        """Per-(row, group) tensor -> per-(row, column) float32."""
        t = t.float()
        if self.per_tensor:
            return t.expand(out, groups.numel())
        return t[:, groups]

    def _zero_float(self, zero: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        if zero is None:
            return torch.full_like(like, float(1 << (self.bits - 1)))
        return zero.float()

    # -- quantize / dequantize --------------------------------------------------------------
    def codes(self, W: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
              g_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Unpacked codes ``(out, in)`` (int64) of ``W`` under the given stored parameters."""
        out, n = W.shape
        groups = self._groups_of(n, W.device, g_idx)
        s = self._expand(scale, groups, out)
        z = self._expand(self._zero_float(zero_point, scale), groups, out)
        return torch.clamp(torch.round(W.float() / s + z), 0, self.qmax).to(torch.int64)

    def quantize(self, W: torch.Tensor, **params: torch.Tensor) -> QuantizedTensor:
        """Quantize ``W: (out, in)`` with RTN parameters or given ``scale``/``zero_point``/``g_idx``.

        Given parameters have shape ``(out, n_groups)`` (``(out, 1)`` for a ``W`` narrower than a group);
        with ``g_idx`` the group of column ``j`` is ``g_idx[j]`` and the result's format has ``act_order``.
        """
        check_weight(W)
        self.validate_shape(tuple(W.shape))
        scale, zero, g_idx = self._check_params(W, params)
        fmt = self.replace(act_order=True) if (g_idx is not None and not self.act_order) else self
        if fmt.act_order and g_idx is None:
            g_idx = group_index(W.shape[1], self.group_size, W.device)
        q = self.codes(W, scale, zero, g_idx)
        data = {"qdata": pack(q, self.bits), "scale": scale.contiguous()}
        if zero is not None:
            data["zero_point"] = zero.contiguous()
        if fmt.act_order:
            data["g_idx"] = g_idx.to(torch.int32).contiguous()
        return QuantizedTensor(fmt, tuple(W.shape), W.dtype, data)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        out, n = q.shape
        codes = unpack(q["qdata"], self.bits, n).float()
        groups = self._groups_of(n, codes.device, q.get("g_idx"))
        s = self._expand(q["scale"], groups, out)
        z = self._expand(self._zero_float(q.get("zero_point"), q["scale"]), groups, out)
        return ((codes - z) * s).to(q.dtype)

    def fake_quantize(self, W: torch.Tensor, **params: torch.Tensor) -> torch.Tensor:
        """Quantize then dequantize without packing (the hot path of GPTQ-style loops), in ``W``'s dtype."""
        check_weight(W)
        scale, zero, g_idx = self._check_params(W, params)
        out, n = W.shape
        groups = self._groups_of(n, W.device, g_idx)
        q = self.codes(W, scale, zero, g_idx).float()
        s = self._expand(scale, groups, out)
        z = self._expand(self._zero_float(zero, scale), groups, out)
        return ((q - z) * s).to(W.dtype)

    def bits_per_weight_formula(self, shape: tuple[int, int]) -> float:
        """Exact stored bits per weight for ``shape``, from the layout above (for tests and size tables)."""
        out, n = shape
        bits = out * packed_len(n, self.bits) * 8
        ng = 1 if self.per_tensor else out * self.n_groups(n)
        sbits = torch.finfo(self.scale_dtype).bits
        bits += ng * sbits
        if not self.symmetric:
            bits += ng * (sbits if self.float_zero_point else 8)
        if self.act_order:
            bits += n * 32
        return bits / (out * n)

    @classmethod
    def examples(cls) -> list["Format"]:
        return [
            cls(bits=4, group_size=128),
            cls(bits=2, group_size=64),
            cls(bits=3, group_size=128),
            cls(bits=5, group_size=32),
            cls(bits=6, group_size=None),
            cls(bits=7, group_size=50),
            cls(bits=8, group_size=None, symmetric=True),
            cls(bits=4, group_size=64, symmetric=True),
            cls(bits=4, group_size=64, float_zero_point=True),
            cls(bits=3, per_tensor=True),
            cls(bits=4, group_size=32, act_order=True),
        ]
