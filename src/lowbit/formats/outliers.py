"""Sparse full-precision outliers beside any dense format (SpQR arXiv 2306.03078, SqueezeLLM arXiv 2306.07629).

``Outliers(base=...)`` stores a dense weight in ``base`` plus a sparse set of entries kept in 16-bit floats;
dequantizing takes the dense weight and *replaces* the outlier entries with their stored values.

Stored tensors (the base format's, then):

- ``outlier_idx``: ``int16 (out + k,)``, compressed rows: the first ``out`` entries are the number of outliers
  in each row, the next ``k`` the column of each outlier in row-major order. A CSR row-pointer array would
  need ``out + 1`` wider entries; counts keep every index at 16 bits (so ``in_features ≤ 32767``).
- ``outlier_val``: ``(k,)`` in ``value_dtype`` (fp16 default), the outliers' values in the same order.

Exact size: ``bits(base) + 16·out + (16 + value bits)·k`` bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.base import Format, QuantizedTensor, check_weight

__all__ = ["Outliers", "encode_outliers", "decode_outliers"]

_MAX_COLS = 32767


def encode_outliers(mask: torch.Tensor, W: torch.Tensor, value_dtype: torch.dtype = torch.float16
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outlier_idx, outlier_val)`` of the entries of ``W: (out, in)`` where ``mask`` is True."""
    if mask.shape != W.shape or mask.dtype != torch.bool:
        raise ValueError(f"outlier mask must be a bool tensor of shape {tuple(W.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    counts = mask.sum(1)
    rows, cols = torch.nonzero(mask, as_tuple=True)  # row-major order
    idx = torch.cat([counts, cols]).to(torch.int16)
    return idx, W[rows, cols].to(value_dtype)


def decode_outliers(outlier_idx: torch.Tensor, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns (int64) of stored outliers."""
    counts = outlier_idx[:out].long()
    cols = outlier_idx[out:].long()
    rows = torch.repeat_interleave(torch.arange(out, device=counts.device), counts)
    if rows.numel() != cols.numel():
        raise ValueError(f"outlier_idx counts sum to {rows.numel()} but {cols.numel()} column indices are stored")
    return rows, cols


@dataclass(frozen=True)
class Outliers(Format):
    """A dense ``base`` format plus sparse 16-bit outliers.

    Args:
        base: the dense format (``IntAffine``, ``RowCodebook``, ``BilevelAffine``, ...).
        value_dtype: dtype of stored outlier values (float16, bfloat16 or float32).
    """

    kind = "outliers"

    base: Format
    value_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if not isinstance(self.base, Format) or isinstance(self.base, Outliers):
            raise TypeError(f"Outliers.base must be a dense lowbit Format, got {type(self.base).__name__}")
        if self.value_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"value_dtype must be float16, bfloat16 or float32, got {self.value_dtype}")

    def tensor_names(self) -> tuple[str, ...]:
        return (*self.base.tensor_names(), "outlier_idx", "outlier_val")

    def validate_shape(self, shape: tuple[int, int]) -> None:
        self.base.validate_shape(shape)
        if shape[1] > _MAX_COLS:
            raise ValueError(f"Outliers stores 16-bit column indices: in_features must be <= {_MAX_COLS}, got {shape[1]}")

    def params(self, W: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.base.params(W)

    def quantize(self, W: torch.Tensor, **params: torch.Tensor) -> QuantizedTensor:
        """Quantize ``W`` densely with ``base`` (given its params) and keep ``outlier_mask`` entries exactly.

        Args:
            W: ``(out, in)``.
            params: ``outlier_mask`` (bool ``(out, in)``, default none) and the base format's parameters.
        """
        check_weight(W)
        self.validate_shape(tuple(W.shape))
        mask = params.pop("outlier_mask", None)
        if mask is None:
            mask = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
        dense = self.base.quantize(W, **params)
        idx, val = encode_outliers(mask, W, self.value_dtype)
        fmt = self if dense.format == self.base else self.replace(base=dense.format)
        return QuantizedTensor(fmt, tuple(W.shape), W.dtype, {**dense.data, "outlier_idx": idx, "outlier_val": val})

    def fake_quantize(self, W: torch.Tensor, **params: torch.Tensor) -> torch.Tensor:
        mask = params.pop("outlier_mask", None)
        Q = self.base.fake_quantize(W, **params)
        if mask is not None:
            Q = torch.where(mask, W.to(self.value_dtype).to(W.dtype), Q)
        return Q

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        base = self.base
        dense = QuantizedTensor(base, q.shape, q.dtype, {k: q[k] for k in base.tensor_names()})
        W = dense.dequantize().clone()
        rows, cols = decode_outliers(q["outlier_idx"], q.shape[0])
        W[rows, cols] = q["outlier_val"].to(W.dtype)
        return W

    def bits_per_weight_formula(self, shape: tuple[int, int], n_outliers: int = 0) -> float:
        """Exact stored bits per weight with ``n_outliers`` outliers (the base must have the same method)."""
        out, n = shape
        base_bits = self.base.bits_per_weight_formula(shape) * out * n
        return (base_bits + 16 * out + (16 + torch.finfo(self.value_dtype).bits) * n_outliers) / (out * n)

    @classmethod
    def examples(cls) -> list["Format"]:
        from lowbit.formats.affine import IntAffine
        from lowbit.formats.codebook import RowCodebook

        return [cls(base=IntAffine(bits=3, group_size=16)), cls(base=RowCodebook(3))]
