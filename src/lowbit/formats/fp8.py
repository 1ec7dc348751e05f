"""FP8 weights (E4M3 / E5M2) through ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` with float32 scales.

Micikevicius et al., "FP8 Formats for Deep Learning", arXiv 2209.05433; Kuzmin et al., arXiv 2208.09225.

Stored tensors: ``qdata`` ``(out, in)`` in the FP8 dtype and ``scale`` float32 ``(out, 1)`` (per output
channel) or ``(1, 1)`` (per tensor), ``scale = absmax / max_finite`` (448 for E4M3, 57344 for E5M2), so the
largest weight maps to the largest finite FP8 value. ``W ≈ qdata · scale``. Rounding is the dtype cast's
round-to-nearest-even; values are clamped to the finite range first (E4M3 has no infinity).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.base import Format, QuantizedTensor, check_weight

__all__ = ["FP8"]

_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class FP8(Format):
    """FP8 weight storage with absmax scaling.

    Args:
        dtype: ``"e4m3"`` (4 exponent bits, 3 mantissa bits, max 448) or ``"e5m2"`` (max 57344).
        per_channel: one scale per output row (True) or one per tensor (False).
    """

    kind = "fp8"

    dtype: str = "e4m3"
    per_channel: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"unknown FP8 dtype {self.dtype!r}; valid choices: {sorted(_DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def max_value(self) -> float:
        return float(torch.finfo(self.torch_dtype).max)

    def tensor_names(self) -> tuple[str, ...]:
        return ("qdata", "scale")

    def validate_shape(self, shape: tuple[int, int]) -> None:
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"FP8 stores 2-D weights with positive sizes, got shape {tuple(shape)}")

    def params(self, W: torch.Tensor) -> dict[str, torch.Tensor]:
        """``scale``: float32 ``(out, 1)`` or ``(1, 1)`` = absmax / max finite value (1 for an all-zero row)."""
        check_weight(W)
        a = W.float().abs()
        absmax = a.amax(1, keepdim=True) if self.per_channel else a.max().reshape(1, 1)
        return {"scale": torch.where(absmax > 0, absmax / self.max_value, torch.ones_like(absmax))}

    def quantize(self, W: torch.Tensor, **params: torch.Tensor) -> QuantizedTensor:
        """Quantize ``W: (out, in)`` with RTN's scale or a given ``scale``."""
        check_weight(W)
        unknown = set(params) - {"scale"}
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)} for {self.kind}; valid: ['scale']")
        scale = params["scale"] if "scale" in params else self.params(W)["scale"]
        want = (W.shape[0], 1) if self.per_channel else (1, 1)
        if tuple(scale.shape) != want:
            raise ValueError(f"scale must have shape {want}, got {tuple(scale.shape)}")
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise ValueError("scale must be finite and positive")
        scale = scale.float().contiguous()
        x = (W.float() / scale).clamp(-self.max_value, self.max_value)
        return QuantizedTensor(self, tuple(W.shape), W.dtype, {"qdata": x.to(self.torch_dtype), "scale": scale})

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        return (q["qdata"].float() * q["scale"]).to(q.dtype)

    def bits_per_weight_formula(self, shape: tuple[int, int]) -> float:
        out, n = shape
        return (out * n * 8 + (out if self.per_channel else 1) * 32) / (out * n)

    @classmethod
    def examples(cls) -> list["Format"]:
        return [cls("e4m3", True), cls("e5m2", True), cls("e4m3", False)]
