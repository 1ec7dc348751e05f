"""Unquantized GGML tensor types F32, F16 and BF16 (one element per "block").

F16 rounds to nearest even (``GGML_FP32_TO_FP16``); BF16 follows ``ggml_compute_fp32_to_bf16`` (round to
nearest even on the top 16 bits, NaN forced quiet).
"""

from __future__ import annotations

import numpy as np

from lowbit.formats.ggml.numerics import F32, f32_to_bf16_bits


def quantize_f32(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    return np.ascontiguousarray(x, dtype="<f4").view(np.uint8).reshape(x.shape[0], -1, 4)


def quantize_f16(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(x.shape[0], -1, 2)


def quantize_bf16(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    return np.ascontiguousarray(f32_to_bf16_bits(x).astype("<u2")).view(np.uint8).reshape(x.shape[0], -1, 2)


def dequantize_f32(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f4").astype(F32)


def dequantize_f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2").astype(F32)


def dequantize_bf16(b: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(b).view("<u2").astype(np.uint32) << 16
    return u.view(np.uint32).view(F32)
