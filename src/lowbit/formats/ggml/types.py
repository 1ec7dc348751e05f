"""The table of GGML tensor types lowbit reads and writes: ids, block geometry and (de)quantizers.

Ids and sizes follow ``ggml.h`` / ``ggml-common.h`` (and gguf-py's ``GGML_QUANT_SIZES``). ``uses_imatrix`` says
whether llama.cpp's quantizer for the type consults an importance matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from lowbit.formats.ggml import floats, iq4, kquants, legacy, ternary

Quantizer = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]
Dequantizer = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class GGMLType:
    """One GGML tensor type.

    Attributes:
        name: upstream spelling (``"Q4_K"``).
        type_id: ``enum ggml_type`` value written in GGUF tensor infos.
        block_size: weights per block (1 for float types).
        type_size: bytes per block.
        quantize: ``x (R, n) float32, qw (n,) | None -> (R, n/block_size, type_size) uint8``.
        dequantize: ``(B, type_size) uint8 -> (B, block_size) float32``.
        uses_imatrix: whether the reference quantizer reads an importance matrix.
        checks_finite: whether ``quantize`` itself raises :class:`~lowbit.formats.ggml.jit.NonFiniteInput` on
            NaN/Inf (its kernels count them while they read each block); else ``quantize_raw`` checks first.
        single_pass: whether ``quantize`` without an importance matrix reads each block once (the reference
            rounding, no search): ``quantize_raw`` then gives each thread one chunk of rows.
    """

    name: str
    type_id: int
    block_size: int
    type_size: int
    quantize: Quantizer
    dequantize: Dequantizer
    uses_imatrix: bool
    checks_finite: bool = False
    single_pass: bool = False

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, n: int) -> int:
        return n // self.block_size * self.type_size


GGML_TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("F32", 0, 1, 4, floats.quantize_f32, floats.dequantize_f32, False),
    GGMLType("F16", 1, 1, 2, floats.quantize_f16, floats.dequantize_f16, False),
    GGMLType("Q4_0", 2, 32, 18, legacy.quantize_q4_0, legacy.dequantize_q4_0, True, checks_finite=True, single_pass=True),
    GGMLType("Q4_1", 3, 32, 20, legacy.quantize_q4_1, legacy.dequantize_q4_1, True, checks_finite=True, single_pass=True),
    GGMLType("Q5_0", 6, 32, 22, legacy.quantize_q5_0, legacy.dequantize_q5_0, True, checks_finite=True, single_pass=True),
    GGMLType("Q5_1", 7, 32, 24, legacy.quantize_q5_1, legacy.dequantize_q5_1, True, checks_finite=True, single_pass=True),
    GGMLType("Q8_0", 8, 32, 34, legacy.quantize_q8_0, legacy.dequantize_q8_0, False, checks_finite=True, single_pass=True),
    GGMLType("Q2_K", 10, 256, 84, kquants.quantize_q2_k, kquants.dequantize_q2_k, True),
    GGMLType("Q3_K", 11, 256, 110, kquants.quantize_q3_k, kquants.dequantize_q3_k, True),
    GGMLType("Q4_K", 12, 256, 144, kquants.quantize_q4_k, kquants.dequantize_q4_k, True),
    GGMLType("Q5_K", 13, 256, 176, kquants.quantize_q5_k, kquants.dequantize_q5_k, True),
    GGMLType("Q6_K", 14, 256, 210, kquants.quantize_q6_k, kquants.dequantize_q6_k, True),
    GGMLType("IQ4_NL", 20, 32, 18, iq4.quantize_iq4_nl, iq4.dequantize_iq4_nl, True),
    GGMLType("IQ4_XS", 23, 256, 136, iq4.quantize_iq4_xs, iq4.dequantize_iq4_xs, True),
    GGMLType("BF16", 30, 1, 2, floats.quantize_bf16, floats.dequantize_bf16, False),
    GGMLType("TQ1_0", 34, 256, 54, ternary.quantize_tq1_0, ternary.dequantize_tq1_0, False, checks_finite=True, single_pass=True),
    GGMLType("TQ2_0", 35, 256, 66, ternary.quantize_tq2_0, ternary.dequantize_tq2_0, False, checks_finite=True, single_pass=True),
)}

GGML_TYPES_BY_ID: dict[int, GGMLType] = {t.type_id: t for t in GGML_TYPES.values()}


def ggml_type(name: str | int) -> GGMLType:
    """Look a type up by upstream name (case-insensitive) or ``ggml_type`` id.

    Raises:
        ValueError: naming the unknown type and the valid choices.
    """
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        t = GGML_TYPES_BY_ID.get(int(name))
        if t is None:
            raise ValueError(f"unknown GGML type id {name}; valid ids: {sorted(GGML_TYPES_BY_ID)}")
        return t
    if not isinstance(name, str):
        raise TypeError(f"GGML type must be a name or an id, got {type(name).__name__}")
    t = GGML_TYPES.get(name.upper())
    if t is None:
        raise ValueError(f"unknown GGML type {name!r}; valid choices: {sorted(GGML_TYPES)}")
    return t
