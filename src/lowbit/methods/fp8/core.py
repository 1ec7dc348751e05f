"""FP8 max-value search (arXiv 2208.09225, Sec. 3-4), the pure math.

Symbols:

=======  =============================================================
x        a tensor to quantize (weights of one channel, or activations)
E, M     exponent and mantissa bits (E + M = 7 for FP8)
b        exponent bias; a real bias is a scale ``s = maxval / max(grid)``
maxval   the largest magnitude kept (clipping point)
=======  =============================================================

The grid math and the search are shared with the format (:mod:`lowbit.formats.minifloat`:
:func:`~lowbit.formats.minifloat.round_to_grid`, :func:`~lowbit.formats.minifloat.search_maxval`,
:func:`~lowbit.formats.minifloat.best_exponent_bits`); this module adds the per-layer choice of ``E``.
"""

from __future__ import annotations

import torch

from lowbit.formats.minifloat import best_exponent_bits

__all__ = ["choose_exponent_bits"]


def choose_exponent_bits(W: torch.Tensor, candidates: tuple[int, ...] = (2, 3, 4, 5), n_grid: int = 50) -> int:
    """The exponent width among ``candidates`` (FP8: ``M = 7 - E``) with the least MSE-searched error on ``W``."""
    _, errs = best_exponent_bits(W.reshape(-1), total_bits=8, n_grid=n_grid)
    return min(candidates, key=lambda e: errs[e])
