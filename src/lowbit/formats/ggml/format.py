"""Every GGML block type as a lowbit :class:`~lowbit.formats.base.Format` (``RTNConfig(format=Q4_K())``).

The stored tensor is ``qdata: (out_features, bytes_per_row) uint8`` — the raw GGML blocks of each row, exactly
what a GGUF file holds, so a quantized layer exports without re-quantizing. Quantization is llama.cpp's
reference quantizer (byte-exact); pass ``act_sq_mean`` (per-input-column mean of squared activations, the
importance matrix of llama.cpp's imatrix tool) to :meth:`GGMLFormat.quantize` for the imatrix-guided search.

Note: the reference searches of Q3_K, Q5_K, IQ4_NL and IQ4_XS are not projections: re-quantizing their
dequantized output can pick other scales, so ``fake_quantize`` is idempotent only for the other types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.formats.base import Format, QuantizedTensor, check_weight
from lowbit.formats.ggml import GGML_TYPES, dequantize_raw, quantize_raw
from lowbit.formats.ggml.types import GGMLType

__all__ = ["GGMLFormat", "ggml_format"] + list(GGML_TYPES)


@dataclass(frozen=True)
class GGMLFormat(Format):
    """Base of the GGML block-type formats; a subclass per type sets ``type_name`` (upstream spelling)."""

    type_name: ClassVar[str] = ""
    idempotent: ClassVar[bool] = True

    @property
    def ggml(self) -> GGMLType:
        return GGML_TYPES[self.type_name]

    @property
    def block_size(self) -> int:
        return self.ggml.block_size

    @property
    def bits_per_weight(self) -> float:
        return self.ggml.bits_per_weight

    def tensor_names(self) -> tuple[str, ...]:
        return ("qdata",)

    def validate_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"{self.type_name} stores 2-D weights (out_features, in_features), got shape {tuple(shape)}")
        bs = self.block_size
        if shape[1] % bs:
            fits = sorted(n for n, t in GGML_TYPES.items() if shape[1] % t.block_size == 0)
            raise ValueError(f"{self.type_name} packs rows in blocks of {bs}; in_features={shape[1]} is not a multiple "
                             f"of {bs}. Types that fit this shape: {fits}")

    def quantize(self, W: torch.Tensor, **params: torch.Tensor) -> QuantizedTensor:
        """Quantize ``W: (out, in)`` with llama.cpp's reference quantizer.

        Args:
            W: float weight.
            act_sq_mean: optional ``(in,)`` importance (mean of squared input activations).
        """
        check_weight(W)
        unknown = set(params) - {"act_sq_mean"}
        if unknown:
            raise ValueError(f"unknown {self.type_name} parameter(s) {sorted(unknown)}; valid: ['act_sq_mean']")
        self.validate_shape(tuple(W.shape))
        raw = quantize_raw(W, self.type_name, imatrix=params.get("act_sq_mean"))
        qdata = torch.from_numpy(raw).to(W.device)
        return QuantizedTensor(self, tuple(W.shape), W.dtype, {"qdata": qdata})

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        qdata = q["qdata"]
        W = dequantize_raw(qdata.detach().cpu().numpy(), self.type_name, tuple(q.shape))
        return W.to(device=qdata.device, dtype=q.dtype)

    @classmethod
    def examples(cls) -> list[Format]:
        return [cls()] if cls.type_name else []


def _make(name: str) -> type[GGMLFormat]:
    doc = (f"GGML ``{name}``: {GGML_TYPES[name].block_size}-weight blocks of {GGML_TYPES[name].type_size} bytes "
           f"({GGML_TYPES[name].bits_per_weight:g} bits per weight), byte-exact with llama.cpp.")
    cls = type(name, (GGMLFormat,), {
        "__doc__": doc, "__module__": __name__, "__qualname__": name, "__annotations__": {},
        "kind": f"ggml_{name}", "type_name": name, "idempotent": name not in ("Q3_K", "Q5_K", "IQ4_NL", "IQ4_XS"),
    })
    return dataclass(frozen=True)(cls)


Q4_0 = _make("Q4_0")
Q4_1 = _make("Q4_1")
Q5_0 = _make("Q5_0")
Q5_1 = _make("Q5_1")
Q8_0 = _make("Q8_0")
Q2_K = _make("Q2_K")
Q3_K = _make("Q3_K")
Q4_K = _make("Q4_K")
Q5_K = _make("Q5_K")
Q6_K = _make("Q6_K")
IQ4_NL = _make("IQ4_NL")
IQ4_XS = _make("IQ4_XS")
TQ1_0 = _make("TQ1_0")
TQ2_0 = _make("TQ2_0")
F16 = _make("F16")
BF16 = _make("BF16")
F32 = _make("F32")

_BY_NAME: dict[str, type[GGMLFormat]] = {c.type_name: c for c in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K,
                                                                  Q6_K, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0, F16, BF16, F32)}


def ggml_format(name: str) -> GGMLFormat:
    """The format instance for an upstream type name (``"Q4_K"`` → ``Q4_K()``)."""
    cls = _BY_NAME.get(name.upper()) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown GGML type {name!r}; valid choices: {sorted(_BY_NAME)}")
    return cls()
