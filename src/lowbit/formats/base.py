"""What the bits mean: the format base class and the typed quantized tensor.

A :class:`Format` is a frozen config that knows how to turn a float weight into stored tensors (with
round-to-nearest, or with parameters a method chose) and back. It knows nothing about calibration or
models. Concrete formats register themselves by ``kind`` when defined (see :mod:`lowbit.config`).

Stored tensors use one vocabulary everywhere: ``qdata, scale, zero_point, codebook, absmax, g_idx,
outlier_idx, outlier_val`` (plus documented, format-specific second-level names such as ``absmax_scale``
for double quantization).

Shapes: a weight ``W`` is ``(out_features, in_features)``; groups run along the input dimension.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, Mapping

import torch

from lowbit.config import Config, ConfigError, config_registry

__all__ = ["Format", "QuantizedTensor", "format_registry", "format_from_spec", "check_weight"]

VOCABULARY = frozenset({
    "qdata", "scale", "zero_point", "codebook", "absmax", "g_idx", "outlier_idx", "outlier_val",
    "absmax_scale", "absmax_offset", "scale_scale", "scale_zero_point", "zero_point_scale",
    "zero_point_zero_point", "lora_a", "lora_b",
    "act_scale",  # static (calibrated) input scale of W8A8 formats, e.g. SmoothQuant O3
})


def format_registry() -> dict[str, type["Format"]]:
    """Every registered format class, keyed by its ``kind``."""
    return config_registry("format")


def check_weight(W: torch.Tensor, name: str = "weight") -> None:
    """Reject weights no format can store: wrong rank or non-finite values."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out_features, in_features), got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {W.dtype}")
    if not bool(torch.isfinite(W).all()):
        bad = int((~torch.isfinite(W)).sum())
        raise ValueError(f"{name} has {bad} NaN/Inf value(s); quantizing it would silently corrupt the model")


@dataclass(frozen=True)
class Format(Config):
    """Base class of all formats. Subclasses are frozen dataclasses with a ``kind``."""

    family: ClassVar[str] = "format"

    # -- to implement ---------------------------------------------------------------------------
    def quantize(self, W: torch.Tensor, **params: torch.Tensor) -> "QuantizedTensor":
        """Quantize ``W: (out, in)``; ``params`` (e.g. ``scale``, ``zero_point``) override RTN's choice."""
        raise NotImplementedError

    def dequantize(self, q: "QuantizedTensor") -> torch.Tensor:
        """Return the float weight ``(out, in)`` in ``q.dtype``."""
        raise NotImplementedError

    def tensor_names(self) -> tuple[str, ...]:
        """Names of the stored tensors, in a fixed order (used by ops and checkpoints)."""
        raise NotImplementedError

    def validate_shape(self, shape: tuple[int, int]) -> None:
        """Raise ``ValueError`` if this format cannot store a weight of ``shape``."""

    def params(self, W: torch.Tensor) -> dict[str, torch.Tensor]:
        """Round-to-nearest's choice of parameters (e.g. ``scale``, ``zero_point``) for ``W: (out, in)``.

        For grouped formats the result has one entry per (row, group); a ``W`` narrower than one group
        gets one group, so a method may fit a group slice and then round single columns with it (GPTQ).
        """
        return {}

    @classmethod
    def examples(cls) -> list["Format"]:
        """Representative instances, used by the format property tests that run over every format."""
        return []

    # -- shared ---------------------------------------------------------------------------------
    def fake_quantize(self, W: torch.Tensor, **params: torch.Tensor) -> torch.Tensor:
        """Quantize then dequantize, in ``W``'s dtype."""
        return self.quantize(W, **params).dequantize()

    def spec(self) -> str:
        """Canonical JSON string of this format (hashable, passed to ops)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


@lru_cache(maxsize=256)
def format_from_spec(spec: str) -> Format:
    """Inverse of :meth:`Format.spec`, cached (ops call it on every forward)."""
    try:
        d = json.loads(spec)
    except json.JSONDecodeError as e:
        raise ConfigError(f"format spec is not valid JSON: {e}") from None
    return Format.from_dict(d)


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized weight: its format, logical shape, float dtype and stored tensors.

    Attributes:
        format: the :class:`Format` that gives the bits their meaning.
        shape: logical ``(out_features, in_features)``.
        dtype: dtype that :meth:`dequantize` returns.
        data: stored tensors by vocabulary name (``qdata``, ``scale``, ...).
    """

    format: Format
    shape: tuple[int, ...]
    dtype: torch.dtype
    data: Mapping[str, torch.Tensor]

    def __post_init__(self) -> None:
        unknown = set(self.data) - VOCABULARY
        if unknown:
            raise ValueError(f"unknown stored tensor name(s) {sorted(unknown)}; vocabulary: {sorted(VOCABULARY)}")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.data[name]

    def get(self, name: str) -> torch.Tensor | None:
        return self.data.get(name)

    def dequantize(self) -> torch.Tensor:
        return self.format.dequantize(self)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Exact bytes of all stored tensors."""
        return sum(t.numel() * t.element_size() for t in self.data.values())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits (data, scales, zero points, codebooks, outliers) per logical weight."""
        return 8.0 * self.nbytes / self.numel

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        return dataclasses.replace(self, data={k: v.to(device) for k, v in self.data.items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.data)

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={tuple(v.shape)}:{str(v.dtype).removeprefix('torch.')}" for k, v in self.data.items())
        return f"QuantizedTensor({self.format.kind}, shape={self.shape}, bpw={self.bits_per_weight:.3f}, {parts})"


def to_jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))
