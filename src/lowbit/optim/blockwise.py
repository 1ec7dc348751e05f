"""Block-wise quantization of optimizer state with a lookup code (arXiv 2110.02861, Sec. 2.1).

A state tensor ``x`` is flattened row-major and cut into blocks of ``block_size`` consecutive elements (the
last block may be shorter). Each block keeps its ``absmax`` in fp32 and every element keeps the index of the
code value nearest to ``x / absmax``: one byte per element at 8 bits, two indices per byte at 4 bits
(first element in the high nibble, as bitsandbytes packs 4-bit data).

Codes (``codebook``), chosen per bit width and sign of the state:

| bits | signed (Adam m, Lion/SGD momentum)              | unsigned (Adam v)                              |
|------|-------------------------------------------------|------------------------------------------------|
| 8    | dynamic map, ``create_dynamic_map(True, 7, 8)`` | dynamic map, ``create_dynamic_map(False, 7, 8)`` |
| 4    | dynamic map, ``create_dynamic_map(True, 3, 4)`` | linear map ``{1/16, 2/16, ..., 1}`` (no zero)   |

The 8-bit codes are bitsandbytes' (arXiv 2110.02861). The 4-bit choice follows "Memory Efficient Optimizers
with 4-bit States" (Li et al., arXiv 2309.01507) as torchao implements it: a 4-bit dynamic map for the first
moment, and for the second moment a linear map without zero, because a second moment rounded to zero turns
the Adam denominator into ``eps`` and the update explodes (the "zero-point problem" of that paper).

The block-wise absmax math itself is the project's one primitive, :mod:`lowbit.formats.blockwise`; this
module adds the optimizer's codes, the uint8 / packed 4-bit storage and the checks.

Rounding is to the nearest code value, with one exception for the second moment v (``keep_nonzero``): a
nonzero v whose nearest code is 0 is stored as the smallest nonzero code (3.25e-7 · absmax at 8 bits). With
plain nearest rounding, a coordinate whose gradient stops (or is ~1e4x smaller than the block's largest) gets
v = 0 while its first moment is still nonzero, and Adam's update m / (sqrt(v) + eps) jumps to ~1e4 x lr
(measured 3.4e4 x lr in tests/optim/test_optimizers.py; the "zero-gradient blow-up" of unsloth-zoo PR #962 and reference Sec. 1.7).
bitsandbytes 0.50.2's CPU quantizer never stores 0 for such values either: it maps every value below its
smaller codes, exact zeros included, to code index 7 (1.56e-5, unsigned) or 131 / 123 (+-2.12e-5, signed).

Every code above that holds negative values also holds 0, so nearest rounding never flips the sign of a
state entry: the sign fix that bitsandbytes' CUDA kernel applies after its binary search never triggers here.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from lowbit.formats import blockwise as absmax_blockwise
from lowbit.formats.dynamic_map import create_dynamic_map

__all__ = ["BLOCK_SIZES", "STATE_BITS", "dequantize_blockwise", "quantize_blockwise", "state_codebook",
           "quantized_nbytes"]

BLOCK_SIZES: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
STATE_BITS: tuple[int, ...] = (4, 8)


def _check(bits: int, block_size: int) -> None:
    if bits not in STATE_BITS:
        raise ValueError(f"bits={bits!r} is not a quantized state width; choose one of {STATE_BITS}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size={block_size!r} is not supported; choose one of {BLOCK_SIZES}")


@lru_cache(maxsize=None)
def _codebook_cpu(bits: int, signed: bool) -> torch.Tensor:
    if bits == 8:
        return create_dynamic_map(signed=signed, max_exponent_bits=7, total_bits=8)[:256].contiguous()
    if signed:
        # bitsandbytes pads every map to 256 entries with zeros; the 16 distinct values are the 4-bit code.
        code = torch.unique(create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4))
        if code.numel() != 16:  # pragma: no cover - guards a change in the shared builder
            raise RuntimeError(f"4-bit signed dynamic map has {code.numel()} distinct values, expected 16")
        return code
    return torch.linspace(0.0, 1.0, 17, dtype=torch.float32)[1:].contiguous()


def state_codebook(bits: int, signed: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """The sorted code used for a state of ``bits`` bits (see the module table).

    Returns:
        (2**bits,) float32 tensor, ascending, on ``device`` (CPU by default). Do not modify it in place.
    """
    if bits not in STATE_BITS:
        raise ValueError(f"bits={bits!r} is not a quantized state width; choose one of {STATE_BITS}")
    return _codebook_cpu(bits, bool(signed)) if device is None else _codebook_on(bits, bool(signed), torch.device(device))


@lru_cache(maxsize=64)
def _codebook_on(bits: int, signed: bool, device: torch.device) -> torch.Tensor:
    # one copy per device: a host-to-device copy at every optimizer step would synchronise the stream
    return _codebook_cpu(bits, signed).to(device)


def quantized_nbytes(numel: int, bits: int, block_size: int) -> int:
    """Bytes of ``qdata`` plus ``absmax`` for a state of ``numel`` elements."""
    _check(bits, block_size)
    qdata = numel if bits == 8 else (numel + 1) // 2
    return qdata + 4 * max(1, math.ceil(numel / block_size))


def quantize_blockwise(x: torch.Tensor, codebook: torch.Tensor, block_size: int = 256, bits: int = 8,
                       keep_nonzero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` block-wise to indices into ``codebook`` (nearest value).

    With ``keep_nonzero``, a nonzero element whose nearest code value is 0 gets the neighbouring nonzero code
    of its sign instead (used for Adam's second moment, see the module docstring).

    Args:
        x: any shape, floating point, finite.
        codebook: (2**bits,) ascending float32 values in [-1, 1], on ``x``'s device.
        block_size: elements per block of the flattened tensor; the last block may be shorter.
        bits: 8 (one index per byte) or 4 (two indices per byte, first in the high nibble).
        keep_nonzero: never round a nonzero element to a zero code.

    Returns:
        qdata: uint8, (numel,) at 8 bits or (ceil(numel / 2),) at 4 bits.
        absmax: (ceil(numel / block_size),) float32, per-block max |x|.
    """
    _check(bits, block_size)
    if codebook.numel() != 2**bits:
        raise ValueError(f"codebook has {codebook.numel()} entries; bits={bits} needs {2**bits}")
    n = x.numel()
    index, absmax = absmax_blockwise.quantize_blockwise(x.detach(), codebook, block_size)
    if keep_nonzero:
        flat = x.detach().reshape(-1)
        zero = (codebook[index] == 0) & (flat != 0)
        step = torch.where(flat > 0, 1, -1)
        index = torch.where(zero, (index + step).clamp(0, codebook.numel() - 1), index)
    idx = index.to(torch.uint8)
    if bits == 4:
        if n % 2:
            idx = torch.nn.functional.pad(idx, (0, 1))
        idx = (idx[0::2] << 4) | idx[1::2]
    return idx, absmax


def dequantize_blockwise(qdata: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor,
                         shape: torch.Size | tuple[int, ...], block_size: int = 256, bits: int = 8) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``codebook[qdata] * absmax`` per block.

    Args:
        qdata: uint8 indices as returned by :func:`quantize_blockwise`.
        absmax: (n_blocks,) float32.
        codebook: (2**bits,) float32 on ``qdata``'s device.
        shape: shape of the tensor that was quantized.
        block_size: as used to quantize.
        bits: as used to quantize.

    Returns:
        float32 tensor of ``shape``.
    """
    _check(bits, block_size)
    n = math.prod(shape)
    if qdata.dtype != torch.uint8:
        raise TypeError(f"qdata must be uint8, got {qdata.dtype}")
    if bits == 4:
        idx = torch.stack(((qdata >> 4), (qdata & 0x0F)), dim=1).view(-1)[:n]
    else:
        idx = qdata.view(-1)
    if idx.numel() != n:
        raise ValueError(f"qdata holds {idx.numel()} codes but shape {tuple(shape)} needs {n}")
    n_blocks = max(1, math.ceil(n / block_size))
    if absmax.numel() != n_blocks:
        raise ValueError(f"absmax has {absmax.numel()} blocks; {n} elements at block_size={block_size} need {n_blocks}")
    return absmax_blockwise.dequantize_blockwise(idx, absmax, codebook, block_size, n).view(shape)
