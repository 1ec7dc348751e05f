"""QA-LoRA: quantization-aware low-rank adaptation (Xu et al., ICLR 2024, arXiv 2309.14717, Sec. 3.3).

The base is group-quantized along the input dimension, ``W = s ⊙ (Ŵ − z)`` with one scale and zero point
per (output row, group). LoRA-A reads the input averaged over each group, so the update is constant inside
a group and folds into the zero point exactly:

    y = W x + α_r · B A P x,        (P x)_g = mean_{j ∈ g} x_j
    ΔW[o, j] = α_r · (B A)[o, g(j)] / |g(j)|
    s ⊙ (Ŵ − z) + ΔW = s ⊙ (Ŵ − (z − ΔW_g / s))   ⇒   z' = z − D / s,   D[o, g] = α_r (B A)[o, g] / |g|

(the paper's "sum" pooling differs only by the factor |g|). ``z'`` is fractional: it must stay a float, an
integer zero point re-rounds ``D/s`` and erases most of the adaptation.

Symbols:

| symbol | meaning | shape |
|--------|---------|-------|
| x      | input | (..., d_in) |
| P      | group-mean pooling | (d_in) -> (n_groups) |
| A      | LoRA down factor over pooled input | (r, n_groups) |
| B      | LoRA up factor | (d_out, r) |
| α_r    | LoRA scaling alpha / r | scalar |
| s, z   | scale and zero point of the base | (d_out, n_groups) |
| Ŵ      | integer codes | (d_out, d_in) |
| D      | per-group weight update | (d_out, n_groups) |
"""

from __future__ import annotations

import torch

__all__ = ["group_sizes", "pool", "group_delta", "expand_groups", "merge_zero_point"]


def group_sizes(d_in: int, group_size: int | None) -> torch.Tensor:
    """``|g|`` for each group, ``(n_groups,)`` int64; the last group is shorter when ``group_size ∤ d_in``."""
    if group_size is None or group_size >= d_in:
        return torch.tensor([d_in])
    n = -(-d_in // group_size)
    sizes = torch.full((n,), group_size)
    sizes[-1] = d_in - (n - 1) * group_size
    return sizes


def pool(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``P x``: mean of ``x (..., d_in)`` over each group of consecutive columns -> ``(..., n_groups)``."""
    d_in = x.shape[-1]
    sizes = group_sizes(d_in, group_size).to(x.device)
    if sizes.numel() == 1:
        return x.mean(-1, keepdim=True)
    g = int(sizes[0])
    n = sizes.numel()
    pad = n * g - d_in
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    sums = xp.reshape(*x.shape[:-1], n, g).sum(-1)
    return sums / sizes.to(x.dtype)


def group_delta(A: torch.Tensor, B: torch.Tensor, alpha_r: float, sizes: torch.Tensor) -> torch.Tensor:
    """``D = α_r · B A / |g|``: ``(d_out, n_groups)``, the weight update of each column of each group."""
    return alpha_r * (B @ A) / sizes.to(A.dtype)


def expand_groups(D: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Per-group ``(d_out, n_groups)`` -> per-column ``(d_out, d_in)``."""
    return torch.repeat_interleave(D, sizes.to(D.device), dim=1)


def merge_zero_point(z: torch.Tensor, s: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """``z' = z − D / s`` (all ``(d_out, n_groups)``), in float: the merged model's zero points."""
    return z - D / s
