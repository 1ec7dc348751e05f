"""GPTQ's math (lowbit.methods.gptq.core) against float64 textbook references, format-independent."""

from __future__ import annotations

import logging

import pytest
import torch

from lowbit.methods.gptq.core import gptq as _gptq, inverse_hessian_factor

BITS = 3
MAXQ = 2 ** BITS - 1


def fit(Wg: torch.Tensor) -> dict[str, torch.Tensor]:
    """Textbook asymmetric min-max parameters per row (the reference quant.py's find_params)."""
    lo = Wg.min(1, keepdim=True).values.clamp(max=0)
    hi = Wg.max(1, keepdim=True).values.clamp(min=0)
    scale = ((hi - lo) / MAXQ).clamp(min=1e-12)
    return {"scale": scale, "zero_point": torch.round(-lo / scale)}


def round_(w: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    q = torch.clamp(torch.round(w / p["scale"]) + p["zero_point"], 0, MAXQ)
    return p["scale"] * (q - p["zero_point"])


def gptq(W: torch.Tensor, H: torch.Tensor, fit_, round__, **kw):  # noqa: ANN001, ANN003
    Q, groups, g_idx, _ = _gptq(W, H, lambda Wg, _u: fit_(Wg), lambda w, p, _j, _d: round__(w, p), **kw)
    return Q, groups, g_idx


def rtn(W: torch.Tensor, g: int | None) -> torch.Tensor:
    g = g or W.shape[1]
    return torch.cat([round_(W[:, j:j + g], fit(W[:, j:j + g])) for j in range(0, W.shape[1], g)], 1)


def correlated(out: int, inp: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    mix = torch.randn(inp, inp, generator=gen, dtype=torch.float64) / inp ** 0.5 + torch.eye(inp, dtype=torch.float64)
    X = torch.randn(tokens, inp, generator=gen, dtype=torch.float64) @ mix
    X[:, :4] *= 10  # a few outlier channels, as in LLM activations
    return W, 2 * X.T @ X / tokens


def herr(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    D = W - Q
    return float(torch.trace(D @ H @ D.T))


def obs_reference(W: torch.Tensor, H: torch.Tensor, g: int | None, damp: float) -> torch.Tensor:
    """Unbatched textbook GPTQ: explicit inverse Hessian, OBS update, Gaussian elimination of row/col i."""
    W = W.clone()
    n = W.shape[1]
    H = H + damp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    g = g or n
    for i in range(n):
        if i % g == 0:
            p = fit(W[:, i:i + g])
        q = round_(W[:, i:i + 1], p)
        Q[:, i:i + 1] = q
        err = (W[:, i:i + 1] - q) / Hinv[i, i]
        W[:, i:] -= err @ Hinv[i:i + 1, i:]
        Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]
        Hinv[i, i] = 1.0  # eliminated; keeps later divisions well defined, never read again
    return Q


@pytest.mark.parametrize("g", [None, 16, 24])
def test_identity_hessian_gives_exactly_rtn(g: int | None) -> None:
    W, _ = correlated(8, 64, 10)
    H = torch.eye(64, dtype=torch.float64)
    Q, _, g_idx = gptq(W, H, fit, round_, group_size=g, block_size=16)
    assert torch.equal(Q, rtn(W, g))
    assert g_idx is None


@pytest.mark.parametrize("g,block", [(None, 128), (16, 16), (16, 40), (24, 7)])
def test_lazy_batches_match_unbatched_obs_reference(g: int | None, block: int) -> None:
    W, H = correlated(6, 48, 200, seed=1)
    Q, _, _ = gptq(W, H, fit, round_, group_size=g, block_size=block)
    torch.testing.assert_close(Q, obs_reference(W, H, g, 0.01), rtol=0, atol=1e-9)


@pytest.mark.parametrize("g", [None, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_hessian_weighted_error_at_most_rtn(g: int | None, act_order: bool) -> None:
    W, H = correlated(32, 128, 512, seed=2)
    Q, _, _ = gptq(W, H, fit, round_, group_size=g, act_order=act_order)
    e_gptq, e_rtn = herr(W, Q, H), herr(W, rtn(W, g), H)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_act_order_g_idx_dequantizes_consistently() -> None:
    W, H = correlated(16, 96, 300, seed=3)
    Q, groups, g_idx = gptq(W, H, fit, round_, group_size=32, act_order=True)
    assert g_idx is not None and g_idx.dtype == torch.int32 and g_idx.shape == (96,)
    assert torch.bincount(g_idx.long()).tolist() == [32, 32, 32]
    # every column is on the grid of the group g_idx names
    scale = torch.cat([p["scale"] for p in groups], 1)[:, g_idx.long()]
    zero = torch.cat([p["zero_point"] for p in groups], 1)[:, g_idx.long()]
    codes = Q / scale + zero
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-9)
    assert bool((codes.round() >= 0).all() and (codes.round() <= MAXQ).all())
    # the first group fitted holds the columns of largest H_ii
    top = torch.argsort(torch.diag(H), descending=True)[:32]
    assert set(top.tolist()) == set(torch.nonzero(g_idx == 0).flatten().tolist())


def test_static_groups_use_groups_of_the_original_weight() -> None:
    W, H = correlated(8, 64, 300, seed=4)
    Q, groups, g_idx = gptq(W, H, fit, round_, group_size=16, act_order=True, static_groups=True)
    assert g_idx is None
    for k, p in enumerate(groups):
        torch.testing.assert_close(p["scale"], fit(W[:, 16 * k:16 * k + 16])["scale"], rtol=0, atol=0)


def test_dead_inputs_are_zeroed() -> None:
    W, H = correlated(8, 32, 100, seed=5)
    H[3, :] = 0
    H[:, 3] = 0
    Q, _, _ = gptq(W, H, fit, round_, group_size=None)
    assert bool(torch.isfinite(Q).all())
    assert torch.equal(Q[:, 3], torch.zeros(8, dtype=torch.float64))


def test_hessian_that_will_not_factor_raises_damp_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    H = torch.eye(64, dtype=torch.float64)
    H[0, 0] = -0.015  # damp 0.01·mean(diag) does not lift it above 0; 0.02 does
    with caplog.at_level(logging.WARNING):
        U = inverse_hessian_factor(H, 0.01)
    assert "damp=0.02" in caplog.text
    lam = 0.02 * torch.diag(H).mean()
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(H + lam * torch.eye(64, dtype=torch.float64)))


def test_hopeless_hessian_raises() -> None:
    with pytest.raises(ValueError, match="not positive definite"):
        inverse_hessian_factor(-torch.eye(4, dtype=torch.float64), 0.01)
    with pytest.raises(ValueError, match="NaN"):
        inverse_hessian_factor(torch.full((4, 4), float("nan")), 0.01)
