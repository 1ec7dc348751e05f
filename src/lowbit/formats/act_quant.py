"""Activation quantization for W8A8 / W4A8 formats, and the integer / FP8 matmul paths.

Why here, as a field of the weight format (``Int8Rowwise(act=ActQuant(...))``, ``Minifloat(act=...)``) rather
than a wrapper module: the scheme "weights in format F, inputs quantized as A" is what a deployment runtime needs
to know (compressed-tensors stores ``input_activations`` beside ``weights`` for the same reason), so it must
travel with the checkpoint. The format's spec already travels with every ``QuantLinear`` and reaches the
``lowbit::qlinear`` op, whose reference calls the format's ``linear`` (see :mod:`lowbit.ops.reference`); no
new module type, no method-specific forward. The backward pass stays the op's: ``∂L/∂x = ∂L/∂y · Ŵ``
(straight-through for the activation rounding), which is what a frozen LoRA base needs.

Activation scales: ``granularity="token"`` is one dynamic scale per row of ``x`` (SmoothQuant O1, LLM.int8());
``"tensor"`` one per call (O2) or, with ``static=True``, a calibrated scale stored as ``act_scale`` (O3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.config import Config

__all__ = ["ActQuant", "quantize_activation", "fake_quantize_activation", "act_linear", "int8_matmul",
           "int8_matmul_reference", "has_int_mm"]

GRANULARITIES = ("token", "tensor")


@dataclass(frozen=True)
class ActQuant(Config):
    """How a layer's input ``x: (..., in_features)`` is quantized before the matmul.

    Args:
        dtype: ``"int8"`` (symmetric, ±127) or a minifloat: ``"e4m3"``, ``"e5m2"``, ``"e3m4"``, ``"e2m5"``.
        granularity: ``"token"`` (one scale per row) or ``"tensor"``.
        static: use the calibrated ``act_scale`` stored with the weight (needs ``granularity="tensor"``).
    """

    family: ClassVar[str] = "act_quant"
    kind: ClassVar[str] = "act_quant"

    dtype: str = "int8"
    granularity: str = "token"
    static: bool = False

    def __post_init__(self) -> None:
        from lowbit.formats.minifloat import PRESETS

        if self.dtype != "int8" and self.dtype not in PRESETS:
            raise ValueError(f"activation dtype={self.dtype!r} unknown; valid choices: {['int8', *sorted(PRESETS)]}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"activation granularity={self.granularity!r} unknown; valid choices: {list(GRANULARITIES)}")
        if self.static and self.granularity != "tensor":
            raise ValueError("static activation scales are per tensor; use granularity='tensor' with static=True")

    @property
    def qmax(self) -> float:
        """Largest representable magnitude of the (unscaled) activation grid."""
        return 127.0 if self.dtype == "int8" else self._grid().max_value

    @property
    def bits(self) -> int:
        return 8 if self.dtype == "int8" else self._grid().total_bits

    def _grid(self):  # type: ignore[no-untyped-def]
        from lowbit.formats.minifloat import PRESETS, MinifloatGrid

        E, M, sp = PRESETS[self.dtype]
        return MinifloatGrid(E, M, sp)

    def scale_from_absmax(self, absmax: torch.Tensor) -> torch.Tensor:
        """Static scale from calibrated ``max|x|`` (a scalar tensor)."""
        return (absmax.to(torch.float32).amax() / self.qmax).clamp(min=1e-12).reshape(1)

    def describe(self) -> str:
        return f"A{self.bits}:{self.dtype}/{self.granularity}{'-static' if self.static else ''}"


def _scale(x: torch.Tensor, act: ActQuant, act_scale: torch.Tensor | None) -> torch.Tensor:
    if act.static:
        if act_scale is None:
            raise ValueError("static activation quantization needs a stored act_scale")
        return act_scale.to(torch.float32).reshape(*([1] * x.dim()))
    xf = x.detach().abs().to(torch.float32)
    amax = xf.amax(dim=-1, keepdim=True) if act.granularity == "token" else xf.amax().reshape(*([1] * x.dim()))
    return (amax / act.qmax).clamp(min=1e-12)


def quantize_activation(x: torch.Tensor, act: ActQuant, act_scale: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x ≈ q · s``: ``q`` int8 (for ``"int8"``) or float32 grid values, ``s`` broadcastable float32 scales."""
    s = _scale(x, act, act_scale)
    y = x.to(torch.float32) / s
    if act.dtype == "int8":
        return torch.round(y).clamp(-127, 127).to(torch.int8), s
    from lowbit.formats.minifloat import round_to_grid

    return round_to_grid(y, act._grid()), s


def fake_quantize_activation(x: torch.Tensor, act: ActQuant | None, act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize ``x`` (identity when ``act`` is None), in ``x``'s dtype."""
    if act is None:
        return x
    q, s = quantize_activation(x, act, act_scale)
    return (q.to(torch.float32) * s).to(x.dtype)


def act_linear(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, act: ActQuant | None,
               act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Reference W·A matmul: fake-quantize ``x`` as ``act`` says, then ``x̂ @ Wᵀ + b`` (``W: (out, in)``)."""
    xq = fake_quantize_activation(x, act, act_scale)
    return torch.nn.functional.linear(xq, W.to(x.dtype), None if bias is None else bias.to(x.dtype))


def has_int_mm(device: torch.device | str = "cpu") -> bool:
    """Whether ``torch._int_mm`` (int8 × int8 → int32) runs on ``device`` in this torch build."""
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        a = torch.ones(32, 32, dtype=torch.int8, device=device)
        return bool(torch._int_mm(a, a)[0, 0] == 32)
    except (RuntimeError, NotImplementedError):
        return False


def int8_matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for int8 ``a: (m, k)``, ``b: (k, n)``, exactly, as int32 (through float64, exact for k < 2^38)."""
    return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for int8 ``a: (m, k)``, ``b: (k, n)`` as int32: ``torch._int_mm`` where it runs, else the reference.

    CUDA's ``_int_mm`` needs ``m > 16`` and ``k, n`` multiples of 8 (other shapes take the reference path); the
    CPU's takes any shape (checked bit-identical to the exact product in tests/formats/test_minifloat.py).
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul needs int8 operands, got {a.dtype} and {b.dtype}")
    m, k = a.shape
    n = b.shape[1]
    fits = a.device.type == "cpu" or (m > 16 and k % 8 == 0 and n % 8 == 0)
    if hasattr(torch, "_int_mm") and fits:
        try:
            return torch._int_mm(a.contiguous(), b)
        except (RuntimeError, NotImplementedError):
            pass
    return int8_matmul_reference(a, b)
