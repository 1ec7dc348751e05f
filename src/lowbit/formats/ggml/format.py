"""Every GGML block type as a lowbit :class:`~lowbit.formats.base.Format` (``RTNConfig(format=Q4_K())``).

The stored tensor is ``qdata: (out_features, bytes_per_row) uint8`` — the raw GGML blocks of each row, exactly
what a GGUF file holds, so a quantized layer exports without re-quantizing. Quantization is llama.cpp's
reference quantizer (byte-exact); pass ``act_sq_mean`` (per-input-column mean of squared activations, the
importance matrix of llama.cpp's imatrix tool) to :meth:`GGMLFormat.quantize` for the imatrix-guided search.

Note: the reference searches of Q2_K, Q3_K, Q5_K, IQ4_NL and IQ4_XS are not projections: re-quantizing their
dequantized output can pick other scales (Q2_K: about 2 % of random 4×256 weights, same as libggml), so
``fake_quantize`` is idempotent only for the other types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from lowbit.formats.base import Format, QuantizedTensor, check_weight
from lowbit.formats.ggml import GGML_TYPES, dequantize_raw, quantize_raw
from lowbit.formats.ggml.legacy import PARAM_TYPES, QK, levels_with_params, pack_with_params, reference_params, value_of_levels
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

    @property
    def group_size(self) -> int | None:
        """Columns sharing one scale, for methods that fit then round (GPTQ): the block size of the types whose
        blocks are one scale (and min) per 32 weights; None for the others (no external parameters)."""
        return self.block_size if self.type_name in PARAM_TYPES else None

    def _valid_params(self) -> list[str]:
        if self.type_name not in PARAM_TYPES:
            return ["act_sq_mean"]
        return ["act_sq_mean", "scale"] + (["zero_point"] if PARAM_TYPES[self.type_name][3] else [])

    def params(self, W: torch.Tensor) -> dict[str, torch.Tensor]:
        """Round-to-nearest's parameters.

        For a ``W`` of more than one block, ``{}``: RTN's choice *is* llama.cpp's reference quantizer, applied
        by :meth:`quantize` (byte-exact). For a slice of at most one block — what a fit-then-round method
        (GPTQ) passes — the reference's f16 ``scale`` (and ``zero_point`` = block min for Q4_1/Q5_1) per row,
        so the method can round single columns with it; only Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 have such
        parameters, other types return ``{}`` (and a fit-then-round method then fails on its single columns).
        """
        if self.type_name not in PARAM_TYPES or W.shape[-1] > QK:
            return {}
        x = W.detach().to(torch.float32).cpu().numpy()
        if x.shape[1] % QK:
            x = np.pad(x, ((0, 0), (0, QK - x.shape[1] % QK)))
        d, m = reference_params(self.type_name, x)
        out = {"scale": torch.from_numpy(d.copy()).to(W.device)}
        if m is not None:
            out["zero_point"] = torch.from_numpy(m.copy()).to(W.device)
        return out

    def quantize(self, W: torch.Tensor, **params: torch.Tensor) -> QuantizedTensor:
        """Quantize ``W: (out, in)`` with llama.cpp's reference quantizer, or round to nearest under given
        per-block ``scale``/``zero_point`` (from :meth:`params`, possibly refit by a method).

        Args:
            W: float weight.
            act_sq_mean: optional ``(in,)`` importance (mean of squared input activations).
            scale, zero_point: ``(out, in/32)`` f16-representable block scales / mins (Q4_0…Q8_0 only).
        """
        check_weight(W)
        unknown = set(params) - set(self._valid_params())
        if unknown:
            raise ValueError(f"unknown {self.type_name} parameter(s) {sorted(unknown)}; valid: {self._valid_params()}")
        self.validate_shape(tuple(W.shape))
        if "scale" in params:
            d, m = self._given(params, W.shape)
            raw = pack_with_params(self.type_name, W.detach().to(torch.float32).cpu().numpy(), d, m)
            raw = raw.reshape(W.shape[0], -1)
        else:
            raw = quantize_raw(W, self.type_name, imatrix=params.get("act_sq_mean"))
        qdata = torch.from_numpy(np.ascontiguousarray(raw)).to(W.device)
        return QuantizedTensor(self, tuple(W.shape), W.dtype, {"qdata": qdata})

    def _given(self, params: dict[str, torch.Tensor], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
        d = params["scale"].detach().to(torch.float32).cpu().numpy()
        d = d.reshape(shape[0], -1)
        m = params.get("zero_point")
        if PARAM_TYPES[self.type_name][3] and m is None:
            raise ValueError(f"{self.type_name} needs zero_point (the block min) together with scale")
        m = None if m is None else m.detach().to(torch.float32).cpu().numpy().reshape(shape[0], -1)
        # stored as f16: round here so the values a method sees are the values the file holds
        d = d.astype(np.float16).astype(np.float32)
        m = None if m is None else m.astype(np.float16).astype(np.float32)
        return d, m

    def fake_quantize(self, W: torch.Tensor, **params: torch.Tensor) -> torch.Tensor:
        """Quantize then dequantize; with given ``scale`` any column count works (GPTQ rounds one column at a
        time with its block's parameters)."""
        if "scale" in params and self.type_name in PARAM_TYPES and W.shape[-1] % QK:
            if self.type_name not in PARAM_TYPES:
                raise ValueError(f"{self.type_name} takes no scale parameters; fit-then-round methods support "
                                 f"{sorted(PARAM_TYPES)}")
            d, m = self._given(params, tuple(W.shape))
            x = W.detach().to(torch.float32).cpu().numpy()
            if d.shape[1] != 1:
                raise ValueError(f"a {W.shape[-1]}-column slice needs one scale per row, got {d.shape[1]}")
            v = value_of_levels(self.type_name, levels_with_params(self.type_name, x, d, m), d, m)
            return torch.from_numpy(v).to(device=W.device, dtype=W.dtype)
        if W.dim() == 2 and W.shape[-1] % self.block_size and "scale" not in params:
            raise ValueError(f"{self.type_name} cannot round a {W.shape[-1]}-column slice on its own (blocks of "
                             f"{self.block_size}); fit-then-round methods (GPTQ) work with {sorted(PARAM_TYPES)}")
        return self.quantize(W, **params).dequantize()

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
        "kind": f"ggml_{name}", "type_name": name, "idempotent": name not in ("Q2_K", "Q3_K", "Q5_K", "IQ4_NL", "IQ4_XS"),
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
