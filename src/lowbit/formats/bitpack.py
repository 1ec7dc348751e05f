"""Dense bit packing of 1..8-bit codes into ``uint8`` along the last dimension.

Layout: the codes of one row form an MSB-first bit stream — the first code occupies the most significant
bits of the first byte, the next code follows immediately (a code may straddle two bytes for 3, 5, 6 and
7 bits), and the last byte of a row is zero-padded. For 4-bit codes this is exactly bitsandbytes'
nibble order (first element in the high nibble). A row of ``n`` codes takes ``ceil(n * bits / 8)`` bytes,
so the only waste is the padding of the last byte of each row, which ``nbytes`` counts.

:func:`pack` and :func:`unpack` are inverse bijections between code tensors ``(..., n)`` with values in
``[0, 2**bits)`` and packed tensors ``(..., packed_len(n, bits))``.
"""

from __future__ import annotations

import torch

__all__ = ["pack", "unpack", "packed_len"]

_FAST = (1, 2, 4, 8)  # widths where codes never straddle a byte


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def packed_len(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits: ``ceil(n * bits / 8)``."""
    _check_bits(bits)
    return (n * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes along the last dimension.

    Args:
        codes: integer tensor ``(..., n)`` with values in ``[0, 2**bits)``.
        bits: code width, 1..8.

    Returns:
        ``uint8`` tensor ``(..., ceil(n * bits / 8))``.
    """
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.dtype.is_complex:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for bits={bits}, "
                         f"got range [{int(codes.min())}, {int(codes.max())}]")
    c = codes.to(torch.uint8)
    n = c.shape[-1]
    lead = c.shape[:-1]
    nbytes = packed_len(n, bits)
    if bits == 8:
        return c.contiguous()
    if bits in _FAST:
        per = 8 // bits
        pad = nbytes * per - n
        if pad:
            c = torch.nn.functional.pad(c, (0, pad))
        c = c.reshape(*lead, nbytes, per)
        out = torch.zeros((*lead, nbytes), dtype=torch.uint8, device=c.device)
        for k in range(per):
            out |= c[..., k] << (8 - bits * (k + 1))
        return out
    # Generic width: 8 codes of b bits are exactly b bytes; assemble them in an int64 (b <= 7: 56 bits).
    n8 = -(-n // 8)
    c = torch.nn.functional.pad(c, (0, n8 * 8 - n)).reshape(*lead, n8, 8).to(torch.int64)
    v = torch.zeros((*lead, n8), dtype=torch.int64, device=c.device)
    for k in range(8):
        v |= c[..., k] << (bits * (7 - k))
    out = torch.stack([(v >> (8 * (bits - 1 - j))) & 0xFF for j in range(bits)], dim=-1)
    return out.reshape(*lead, n8 * bits)[..., :nbytes].to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(..., ceil(n * bits / 8))`` ``uint8`` -> ``(..., n)`` ``uint8`` codes."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed data must be uint8, got {packed.dtype}")
    nbytes = packed_len(n, bits)
    if packed.shape[-1] != nbytes:
        raise ValueError(f"{n} codes of {bits} bits need {nbytes} bytes per row, got {packed.shape[-1]}")
    lead = packed.shape[:-1]
    if bits == 8:
        return packed.contiguous()
    mask = (1 << bits) - 1
    if bits in _FAST:
        per = 8 // bits
        parts = [(packed >> (8 - bits * (k + 1))) & mask for k in range(per)]
        return torch.stack(parts, dim=-1).reshape(*lead, nbytes * per)[..., :n]
    n8 = -(-n // 8)
    b = torch.nn.functional.pad(packed, (0, n8 * bits - nbytes)).reshape(*lead, n8, bits).to(torch.int64)
    v = torch.zeros((*lead, n8), dtype=torch.int64, device=packed.device)
    for j in range(bits):
        v |= b[..., j] << (8 * (bits - 1 - j))
    codes = torch.stack([(v >> (bits * (7 - k))) & mask for k in range(8)], dim=-1)
    return codes.reshape(*lead, n8 * 8)[..., :n].to(torch.uint8)
