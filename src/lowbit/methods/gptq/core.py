"""GPTQ: column-by-column rounding with optimal second-order error feedback (Frantar et al., arXiv 2210.17323).

Symbols (paper, Algorithm 1):

======  ===========================================================================
W       weight ``(d_row, d_col)`` = ``(out_features, in_features)``, updated in place
H       Hessian of the layer's squared error, ``2·XᵀX/n``, ``(d_col, d_col)``
λ       dampening, ``damp · mean(diag(H))`` added to ``diag(H)``
U       upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``); row ``i`` holds the updates for column ``i``
B       lazy-batch width (columns updated together, ``block_size``)
g       group size (columns sharing one set of rounding parameters)
Q       the quantized (dequantized-value) weight
E       scaled errors ``(w - q) / U_ii`` of one lazy batch
perm    column order (act-order: ``argsort(diag(H), descending)``)
======  ===========================================================================

Rounding is abstract: ``fit(W_slice, u) -> params`` chooses parameters for a group of columns and
``round_(w, params, j, U_jj) -> q`` rounds one column ``(d_row, 1)`` with them, so any format (integer grids,
codebooks, minifloats) can be used, and SpQR can reuse the sweep with its outlier-aware fit and rounding.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["gptq", "inverse_hessian_factor", "remove_dead_inputs"]

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]


def remove_dead_inputs(W: torch.Tensor, H: torch.Tensor) -> None:
    """Inputs never active (``H_ii = 0``): set ``H_ii = 1`` and ``W[:, i] = 0`` in place, as the reference does."""
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0


def inverse_hessian_factor(H: torch.Tensor, damp: float, max_tries: int = 8) -> torch.Tensor:
    """``U`` with ``UᵀU = (H + λI)⁻¹``, ``λ = damp·mean(diag H)``; doubles ``damp`` until ``H + λI`` factors.

    Raises:
        ValueError: if ``H`` is not finite or still does not factor after ``max_tries`` doublings.
    """
    if not bool(torch.isfinite(H).all()):
        raise ValueError("Hessian has NaN/Inf entries; check the calibration inputs of this layer")
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    d = damp
    for attempt in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + d * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                if attempt:
                    log.warning("GPTQ: Hessian did not factor with damp=%g; used damp=%g instead (more calibration "
                                "tokens or a larger damp avoid this)", damp, d)
                return U
        d *= 2
    raise ValueError(f"Hessian is not positive definite even with damp={d / 2:g} (started at {damp:g}); "
                     "use more calibration data or a larger damp")


@contextlib.contextmanager
def _sweep_threads(W: torch.Tensor) -> Iterator[None]:
    """One CPU thread for the column sweep of layers up to 2048 rows: its thousands of small ops gain nothing
    from a second thread, and when another process competes for the cores each op waits for a time slice
    (``benchmarks/cpu_hotspots.py`` on 2 cores, a 576x1536 layer: equal times idle, 2.3x slower on 2 threads
    while one other process ran)."""
    n = torch.get_num_threads()
    one = W.device.type == "cpu" and W.shape[0] <= 2048 and n > 1
    if one:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if one:
            torch.set_num_threads(n)


def gptq(W: torch.Tensor, H: torch.Tensor, fit: Callable[..., Params], round_: Callable[..., torch.Tensor], *,
         group_size: int | None, damp: float = 0.01, block_size: int = 128, act_order: bool = False,
         static_groups: bool = False, on_factor: Callable[[torch.Tensor, torch.Tensor], None] | None = None
         ) -> tuple[torch.Tensor, list[Params], torch.Tensor | None, torch.Tensor]:
    """Quantize ``W: (out, in)`` given ``H: (in, in)``.

    Args:
        fit: ``fit(W_g, u_g) -> params`` for columns ``W_g = W[:, j:j+g]`` (the whole ``W`` when ``group_size``
            is None), with ``u_g`` their ``diag(U)`` (None for fits made before ``U`` exists: static groups,
            per-row parameters). SpQR uses ``u_g`` for its leave-one-out outlier criterion.
        round_: ``round_(w, params, j, u_jj) -> q`` rounds column ``j`` (in quantization order) ``w: (out, 1)``
            and returns it dequantized as a new tensor (not a view of ``w``, which the sweep updates afterwards);
            a method may keep some entries unrounded (SpQR outliers).
        group_size: ``g``; None = one parameter set per row for all columns.
        static_groups: fit every group on the original ``W`` before any update (groups stay contiguous in the
            original column order even with act-order).
        on_factor: called once with ``(W, U)`` (permuted, dead inputs removed) before the sweep.

    Returns:
        ``(Q, params, g_idx, perm)``: ``Q: (out, in)`` in the original column order; one params dict per group
        in the order groups were fitted; ``g_idx: (in,)`` int32 group of each original column (None when
        groups are contiguous and in order: without act-order or with static groups); ``perm`` the order in
        which columns were quantized.
    """
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.to(dtype).clone()
    H = H.to(dtype).clone()
    n = W.shape[1]
    remove_dead_inputs(W, H)
    g = group_size or n
    groups: list[Params] = [fit(W[:, j:j + g], None) for j in range(0, n, g)] if (static_groups or not group_size) else []
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n, device=W.device)
    if act_order:
        W, H = W[:, perm], H[perm][:, perm]
    U = inverse_hessian_factor(H, damp)
    if on_factor is not None:
        on_factor(W, U)
    with _sweep_threads(W):
        Q, groups = _sweep(W, U, fit, round_, groups, perm, group_size, static_groups, block_size)
    inv = torch.argsort(perm)
    g_idx = None
    if act_order and group_size and not static_groups:
        g_idx = (inv // g).to(torch.int32)
    return Q[:, inv], groups, g_idx, perm


def _sweep(W: torch.Tensor, U: torch.Tensor, fit: Callable[..., Params], round_: Callable[..., torch.Tensor],
           groups: list[Params], perm: torch.Tensor, group_size: int | None, static_groups: bool,
           block_size: int) -> tuple[torch.Tensor, list[Params]]:
    """The lazy-batch column sweep of :func:`gptq` (in the quantization order): ``(Q, groups)``."""
    dtype, n = W.dtype, W.shape[1]
    g = group_size or n
    u = torch.diag(U)
    perm_list = perm.tolist()  # read per column below; a host list avoids a device sync each time
    Q = torch.zeros_like(W)
    params: Params = groups[0] if groups else {}
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E = torch.zeros_like(W1)
        # Per-column Python work is the cost on small layers: views of every column, error column, U row tail
        # and U_ii are taken once per batch, so a column costs its rounding plus four tensor ops.
        cols, errs, diag = W1.split(1, 1), E.split(1, 1), U1.diagonal().unbind(0)
        tails = [(W1[:, i:], U1[i:i + 1, i:]) for i in range(i2 - i1)]
        Q1: list[torch.Tensor] = []
        for i in range(i2 - i1):
            j = i1 + i
            if group_size and static_groups:
                params = groups[perm_list[j] // g]
            elif group_size and j % g == 0:
                # the group may run past this lazy batch: apply the batch's pending updates to those columns
                tail = W[:, i2:j + g] - E[:, :i] @ U[i1:j, i2:j + g]
                groups.append(fit(torch.cat([W1[:, i:i + g], tail], 1), u[j:j + g]))
                params = groups[-1]
            w = cols[i]
            q = round_(w, params, j, diag[i]).to(dtype)
            Q1.append(q)
            torch.div(w - q, diag[i], out=errs[i])
            W1_tail, U1_row = tails[i]
            W1_tail.sub_(errs[i] @ U1_row)
        Q[:, i1:i2] = torch.cat(Q1, 1)
        W[:, i2:] -= E @ U[i1:i2, i2:]
    return Q, groups
