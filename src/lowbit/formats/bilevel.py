"""Bilevel affine format: small groups whose scales and zero points are themselves quantized (SpQR, arXiv 2306.03078).

Weights: ``bits``-bit codes ``q`` in groups of ``group_size`` input columns (β₂), ``W ≈ (q - z)·s`` with a
fractional zero point ``z`` and scale ``s`` per (row, group). The statistics ``s`` and ``z`` of one column group
form vectors over the output rows; each vector is quantized again, asymmetric min-max with ``stat_bits`` bits
in groups of ``stat_group_size`` consecutive rows (β₁), keeping a 16-bit second-level scale and zero point.

Stored tensors (``ng = ceil(in/group_size)`` column groups, ``ns = ceil(out/stat_group_size)`` row groups):

- ``qdata``: ``uint8 (out, ceil(in·bits/8))`` packed weight codes (:mod:`lowbit.formats.bitpack`).
- ``scale``, ``zero_point``: ``uint8 (ng, ceil(out·stat_bits/8))``, the first-level statistics' codes, packed
  along the output rows of each column group.
- ``scale_scale``, ``scale_zero_point``, ``zero_point_scale``, ``zero_point_zero_point``: ``float16 (ns, ng)``.

Parameters (:meth:`BilevelAffine.params`, what ``quantize``/``fake_quantize`` accept) are the same tensors
unpacked: ``scale``/``zero_point`` codes ``(out, ng)`` and second-level ``(ns, ng)``; a ``W`` narrower than one
group gets one group, so SpQR's GPTQ sweep can fit a group and round single columns with it.

Exact size, ``out`` and ``in`` multiples of 8 and of the group sizes:
``bits + 2·stat_bits/group_size + 4·16/(group_size·stat_group_size)`` bits per weight (SpQR's formula).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.base import Format, QuantizedTensor, check_weight
from lowbit.formats.bitpack import pack, packed_len, unpack

__all__ = ["BilevelAffine", "minmax_affine"]

_STATS = ("scale", "scale_scale", "scale_zero_point", "zero_point", "zero_point_scale", "zero_point_zero_point")


def minmax_affine(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max ``(scale, zero)`` with a fractional zero, per row of ``x: (rows, n)`` → ``(rows, 1)``.

    A constant row gets the range ``[x - 1, x + 1]`` as in SpQR's quantizer, so the scale is never zero.
    """
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    flat = hi == lo
    lo, hi = torch.where(flat, lo - 1, lo), torch.where(flat, hi + 1, hi)
    scale = (hi - lo) / ((1 << bits) - 1)
    return scale, -lo / scale


def _rows_to_groups(v: torch.Tensor, size: int) -> torch.Tensor:
    """``(rows, k)`` → ``(ceil(rows/size), size·k)``-like view per row group, padded with the group's first row."""
    rows = v.shape[0]
    ns = -(-rows // size)
    pad = ns * size - rows
    if pad:
        v = torch.cat([v, v[(ns - 1) * size:(ns - 1) * size + 1].expand(pad, -1)])
    return v.reshape(ns, size, -1)


@dataclass(frozen=True)
class BilevelAffine(Format):
    """SpQR's dense part: ``bits``-bit codes, groups of ``group_size``, statistics quantized to ``stat_bits``.

    Args:
        bits: weight code width, 2..8 (SpQR: 3 or 4).
        group_size: input columns per group (β₂, SpQR: 16).
        stat_bits: code width of the quantized scales and zero points (SpQR: 3).
        stat_group_size: output rows sharing one second-level scale/zero (β₁, SpQR: 16).
    """

    kind = "bilevel_affine"

    bits: int = 3
    group_size: int = 16
    stat_bits: int = 3
    stat_group_size: int = 16

    def __post_init__(self) -> None:
        for name, lo in (("bits", 2), ("stat_bits", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= 8:
                raise ValueError(f"BilevelAffine {name} must be an int in {lo}..8, got {v!r}")
        for name in ("group_size", "stat_group_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"BilevelAffine {name} must be a positive int, got {v!r}")

    def tensor_names(self) -> tuple[str, ...]:
        return ("qdata", *_STATS)

    def validate_shape(self, shape: tuple[int, int]) -> None:
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"BilevelAffine stores 2-D weights with positive sizes, got shape {tuple(shape)}")

    # -- parameters -------------------------------------------------------------------------
    def _stat_params(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize per-(row, group) statistics ``v: (out, ng)`` in row groups: codes, fp16 scale, fp16 zero."""
        out, ng = v.shape
        G = _rows_to_groups(v, self.stat_group_size).permute(0, 2, 1).reshape(-1, self.stat_group_size)
        s2, z2 = minmax_affine(G, self.stat_bits)
        s2 = s2.to(torch.float16).clamp(min=torch.finfo(torch.float16).tiny)
        z2 = z2.to(torch.float16)
        ns = -(-out // self.stat_group_size)
        s2, z2 = s2.reshape(ns, ng), z2.reshape(ns, ng)
        rows = torch.arange(out, device=v.device) // self.stat_group_size
        codes = torch.round(v / s2[rows].float() + z2[rows].float()).clamp(0, (1 << self.stat_bits) - 1)
        return codes.to(torch.uint8), s2, z2

    def params(self, W: torch.Tensor) -> dict[str, torch.Tensor]:
        """Min-max statistics of each (row, group), then quantized in row groups (SpQR's find_params)."""
        check_weight(W)
        out, n = W.shape
        gs = min(self.group_size, n)
        ng = -(-n // gs)
        Wf = W.float()
        s = torch.empty(out, ng, device=W.device)
        z = torch.empty(out, ng, device=W.device)
        for k in range(ng):
            sk, zk = minmax_affine(Wf[:, k * gs:(k + 1) * gs], self.bits)
            s[:, k:k + 1], z[:, k:k + 1] = sk, zk
        sc, ss, sz = self._stat_params(s)
        zc, zs, zz = self._stat_params(z)
        return {"scale": sc, "scale_scale": ss, "scale_zero_point": sz,
                "zero_point": zc, "zero_point_scale": zs, "zero_point_zero_point": zz}

    def stats(self, p: dict[str, torch.Tensor], out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized first-level ``(scale, zero)``, each ``(out, ng)`` float32, from (unpacked) parameters."""
        rows = torch.arange(out, device=p["scale"].device) // self.stat_group_size
        s = (p["scale"].float() - p["scale_zero_point"][rows].float()) * p["scale_scale"][rows].float()
        z = (p["zero_point"].float() - p["zero_point_zero_point"][rows].float()) * p["zero_point_scale"][rows].float()
        return s.clamp(min=torch.finfo(torch.float16).tiny), z

    def _check_params(self, W: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        unknown = set(params) - set(_STATS)
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)} for {self.kind}; valid: {sorted(_STATS)}")
        if not params:
            return self.params(W)
        missing = set(_STATS) - set(params)
        if missing:
            raise ValueError(f"{self.kind} needs all of {sorted(_STATS)}; missing {sorted(missing)}")
        out, n = W.shape
        ng = -(-n // min(self.group_size, n))
        ns = -(-out // self.stat_group_size)
        for k in _STATS:
            want = (out, ng) if k in ("scale", "zero_point") else (ns, ng)
            if tuple(params[k].shape) != want:
                raise ValueError(f"{k} must have shape {want} for a weight of shape {tuple(W.shape)}, "
                                 f"got {tuple(params[k].shape)}")
        return params

    def _expand(self, t: torch.Tensor, n: int) -> torch.Tensor:
        gs = min(self.group_size, n)
        return t[:, torch.arange(n, device=t.device) // gs]

    # -- quantize / dequantize --------------------------------------------------------------
    def _codes(self, W: torch.Tensor, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, n = W.shape
        s, z = self.stats(p, out)
        s, z = self._expand(s, n), self._expand(z, n)
        q = torch.clamp(torch.round(W.float() / s + z), 0, (1 << self.bits) - 1)
        return q, s, z

    def fake_quantize(self, W: torch.Tensor, **params: torch.Tensor) -> torch.Tensor:
        check_weight(W)
        q, s, z = self._codes(W, self._check_params(W, params))
        return ((q - z) * s).to(W.dtype)

    def quantize(self, W: torch.Tensor, **params: torch.Tensor) -> QuantizedTensor:
        check_weight(W)
        self.validate_shape(tuple(W.shape))
        p = self._check_params(W, params)
        q, _, _ = self._codes(W, p)
        data = {"qdata": pack(q.to(torch.int64), self.bits)}
        for k in _STATS:
            t = p[k]
            if k in ("scale", "zero_point"):
                t = pack(t.to(torch.int64).T.contiguous(), self.stat_bits)
            data[k] = t.to(torch.float16).contiguous() if t.is_floating_point() else t.contiguous()
        return QuantizedTensor(self, tuple(W.shape), W.dtype, data)

    def unpacked_params(self, q: QuantizedTensor) -> dict[str, torch.Tensor]:
        """The stored statistics in parameter form (codes unpacked to ``(out, ng)``)."""
        out = q.shape[0]
        p = {k: q[k] for k in _STATS}
        for k in ("scale", "zero_point"):
            p[k] = unpack(q[k], self.stat_bits, out).T
        return p

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        out, n = q.shape
        codes = unpack(q["qdata"], self.bits, n).float()
        s, z = self.stats(self.unpacked_params(q), out)
        return ((codes - self._expand(z, n)) * self._expand(s, n)).to(q.dtype)

    def bits_per_weight_formula(self, shape: tuple[int, int]) -> float:
        out, n = shape
        gs = min(self.group_size, n)
        ng, ns = -(-n // gs), -(-out // self.stat_group_size)
        bits = out * packed_len(n, self.bits) * 8 + 2 * ng * packed_len(out, self.stat_bits) * 8 + 4 * ns * ng * 16
        return bits / (out * n)

    @classmethod
    def examples(cls) -> list["Format"]:
        return [cls(), cls(bits=4), cls(bits=2, group_size=32, stat_bits=4, stat_group_size=8)]
