"""The dynamic (dynamic-tree) quantization map of bitsandbytes' 8-bit optimizers and QLoRA double quantization.

Dettmers et al., "8-bit Optimizers via Block-wise Quantization", arXiv 2110.02861 (section 2.2), after
Dettmers, "8-Bit Approximations for Parallelism in Deep Learning", arXiv 1511.04561.

A code is a dynamic exponent (the position of the first set bit after the sign: decade ``10^-k``) followed
by a linear fraction that gets the remaining bits. Decade ``i`` (``i = 0..E-1``, value scale
``10^(i-E+1)``) holds the midpoints of ``linspace(0.1, 1, 2^(i+N-E) + 1)`` (``2^(i+N-E+1) + 1`` points
when unsigned), where ``N = total_bits - 1`` and ``E = max_exponent_bits``; signed maps mirror them; ``0``
and ``1.0`` are appended. The table is built in float32 exactly as ``bitsandbytes.functional.create_dynamic_map``
builds it (including its zero padding to 256 entries for ``total_bits < 8``), so codes agree bit for bit.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["create_dynamic_map", "dynamic_map_on"]


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """A fresh copy of the cached table of :func:`dynamic_map_on` on the CPU (callers may modify it)."""
    return dynamic_map_on(torch.device("cpu"), signed, max_exponent_bits, total_bits).clone()


@functools.lru_cache(maxsize=64)
def dynamic_map_on(device: torch.device, signed: bool = True, max_exponent_bits: int = 7,
                   total_bits: int = 8) -> torch.Tensor:
    """The dynamic map on ``device``, built once per process and device: read-only (never modify it).

    Per-call rebuilding cost a Python loop and, on a GPU, a host-to-device copy that synchronised the stream
    at every dequantization (QLoRA's forward and backward, the 8-bit optimizers' steps).
    """
    if device.type != "cpu":
        return dynamic_map_on(torch.device("cpu"), signed, max_exponent_bits, total_bits).to(device)
    return _build(signed, max_exponent_bits, total_bits)


def _build(signed: bool, max_exponent_bits: int, total_bits: int) -> torch.Tensor:
    """Sorted float32 table of 256 code values in ``[-1, 1]`` (signed) or ``[0, 1]`` (unsigned).

    Args:
        signed: include negative values (Adam's first moment, double-quantized absmax) or not (second moment).
        max_exponent_bits: ``E``, the number of decades.
        total_bits: code width; tables for fewer than 8 bits are zero-padded to 256 entries (as bitsandbytes).

    Returns:
        ``(256,)`` float32, sorted ascending.
    """
    if not isinstance(total_bits, int) or not 2 <= total_bits <= 8:
        raise ValueError(f"total_bits must be an int in 2..8, got {total_bits!r}")
    n_free = total_bits - 1
    if not isinstance(max_exponent_bits, int) or not 1 <= max_exponent_bits <= n_free:
        raise ValueError(f"max_exponent_bits must be an int in 1..{n_free} for total_bits={total_bits}, "
                         f"got {max_exponent_bits!r}")
    values: list[float] = []

    def decade(i: int, n_points: int) -> None:
        edges = torch.linspace(0.1, 1, n_points, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        magnitude = 10 ** (-(max_exponent_bits - 1) + i)
        values.extend((magnitude * mids).tolist())
        if signed:
            values.extend((-magnitude * mids).tolist())

    for i in range(max_exponent_bits):
        frac_bits = i + n_free - max_exponent_bits + (0 if signed else 1)
        decade(i, 2 ** frac_bits + 1)
    extra = 2 ** (n_free - max_exponent_bits) - 1  # codes with no indicator bit: the top decade gets them
    if extra > 0:
        decade(max_exponent_bits - 1, extra + 1)
    values += [0.0, 1.0]
    if len(values) != 2 ** total_bits:
        raise ValueError(f"dynamic map with signed={signed}, max_exponent_bits={max_exponent_bits}, "
                         f"total_bits={total_bits} has {len(values)} values, not {2 ** total_bits}")
    values += [0.0] * (256 - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)
