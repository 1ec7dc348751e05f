"""Temporary builder of the dynamic quantization map (arXiv 2110.02861, Sec. 2.2).

Used only until ``lowbit.formats.dynamic_map`` lands; :mod:`lowbit.optim.blockwise` prefers that module.
"""

from __future__ import annotations

import torch


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """Build the dynamic-exponent map of ``2**total_bits`` sorted values in [-1, 1] (signed) or [0, 1].

    Each exponent level i (decade ``10**(i - max_exponent_bits + 1)``) holds the midpoints of an even
    linear split of [0.1, 1]; the level gets twice as many values as the one below it. 0 and 1 are added.
    Unused slots (only when ``total_bits`` leaves room) are filled with 0, as bitsandbytes does.

    Returns:
        (2**total_bits,) float32 tensor, sorted ascending.
    """
    values: list[float] = []
    non_sign_bits = total_bits - 1
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        n = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        edges = torch.linspace(0.1, 1, int(n), dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        values += (scale * mids).tolist()
        if signed:
            values += (-scale * mids).tolist()
    if extra > 0:
        edges = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        values += (scale * mids).tolist()
        if signed:
            values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)
