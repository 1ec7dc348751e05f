"""Block-wise absmax quantization with a lookup code: the primitive under NF4/FP4, double quantization and
the 8-bit optimizers.

Dettmers et al., arXiv 2110.02861 (block-wise quantization) and arXiv 2305.14314 (QLoRA). Semantics follow
bitsandbytes' reference kernels so that codes agree bit for bit: flatten ``A`` row-major, split into blocks of
``block_size`` consecutive elements (the last block may be shorter), ``absmax_b = max |A_b|`` in float32,
``x = clamp(A · (1 / max(absmax_b, 1e-38)), -1, 1)`` and ``index = nearest entry of code`` (ties go to the
smaller value). ``code`` need not be sorted (bitsandbytes' FP4 table is in bit-pattern order): the stored
index is the position in ``code``.
"""

from __future__ import annotations

import torch

__all__ = ["quantize_blockwise", "dequantize_blockwise", "nearest_code"]


def nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (int64) into ``code`` of the entry nearest to each ``x`` (ties: the smaller value)."""
    code = code.to(x.device)
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
    return order[torch.bucketize(x, bounds)]


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``A`` (any shape) block-wise with ``code``.

    Args:
        A: float tensor, flattened row-major.
        code: ``(K,)`` float32 code values in ``[-1, 1]``.
        block_size: elements per block.

    Returns:
        ``(index, absmax)``: int64 ``(A.numel(),)`` indices into ``code`` and float32 ``(ceil(numel/block_size),)``.
    """
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    flat = A.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // block_size)
    pad = n_blocks * block_size - n
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(n_blocks, block_size)
    absmax = blocks.abs().amax(-1)
    x = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(-1), -1, 1).reshape(-1)[:n]
    return nearest_code(x, code.float()), absmax


def dequantize_blockwise(index: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block_size: int,
                         numel: int) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: float32 ``(numel,)`` = ``code[index] · absmax[block]``."""
    vals = code.to(index.device, torch.float32)[index.reshape(-1)[:numel].long()]
    n_blocks = absmax.numel()
    pad = n_blocks * block_size - numel
    vals = torch.nn.functional.pad(vals, (0, pad)).reshape(n_blocks, block_size) * absmax.float().unsqueeze(-1)
    return vals.reshape(-1)[:numel]
