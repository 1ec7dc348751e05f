"""Pure-PyTorch reference implementations: dequantize, then matmul. Runs everywhere; the test oracle."""

from __future__ import annotations

import torch

from lowbit.formats.base import QuantizedTensor, format_from_spec


def as_quantized(data: list[torch.Tensor], spec: str, shape: list[int], dtype: torch.dtype) -> QuantizedTensor:
    fmt = format_from_spec(spec)
    names = fmt.tensor_names()
    if len(names) != len(data):
        raise ValueError(f"format {fmt.kind} stores {list(names)}, got {len(data)} tensors")
    return QuantizedTensor(fmt, tuple(shape), dtype, dict(zip(names, data)))


def dequantize(data: list[torch.Tensor], spec: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    return as_quantized(data, spec, shape, dtype).dequantize().to(dtype).contiguous()


def qlinear(x: torch.Tensor, data: list[torch.Tensor], spec: str, shape: list[int], bias: torch.Tensor | None) -> torch.Tensor:
    fmt = format_from_spec(spec)
    if hasattr(fmt, "linear"):  # formats that quantize activations too (W8A8, LLM.int8()) own their matmul
        return fmt.linear(x, as_quantized(data, spec, shape, x.dtype), bias)
    W = dequantize(data, spec, shape, x.dtype)
    return torch.nn.functional.linear(x, W, None if bias is None else bias.to(x.dtype))
