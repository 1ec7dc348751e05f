"""FP8 W8A8: the torch._scaled_mm path equals the reference, E4M3 beats E5M2 on Gaussian-like weights, the
MSE max-value search never loses to absmax, and the per-layer exponent choice follows the tails."""

from __future__ import annotations

import pytest
import torch

from lowbit.config import ConfigError
from lowbit.formats.act_quant import ActQuant, act_linear
from lowbit.formats.minifloat import Minifloat, _scaled_mm_ok, fp8_scaled_linear
from lowbit.methods.base import MethodConfig, get_method
from lowbit.methods.fp8 import FP8Config
from lowbit.methods.fp8.core import choose_exponent_bits
from lowbit.nn.linear import QuantLinear
from lowbit.quantize import quantize_
from tests.methods.act_aware_helpers import logit_mse, tiny_llama, token_ids


@pytest.mark.skipif(not hasattr(torch, "_scaled_mm"), reason="torch._scaled_mm not in this build")
@pytest.mark.parametrize("w,a", [("e4m3", "e4m3"), ("e5m2", "e5m2"), ("e4m3", "e5m2")])
def test_scaled_mm_path_equals_reference(w: str, a: str) -> None:
    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(64, 96, generator=g), torch.randn(2, 16, 96, generator=g) * 3
    fmt = Minifloat.preset(w, act=ActQuant(a, "token"))
    q = fmt.quantize(W)
    assert _scaled_mm_ok(fmt, q, x)
    bias = torch.randn(64, generator=g)
    fast = fp8_scaled_linear(x, q, bias)
    ref = act_linear(x, q.dequantize(), bias, fmt.act)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(QuantLinear(q, bias)(x), ref, rtol=1e-5, atol=1e-4)


def test_e4m3_w8a8_is_close_and_better_than_e5m2() -> None:
    test = token_ids(4, 32, 2)
    ref_model = tiny_llama()
    with torch.no_grad():
        ref = ref_model(test).logits
    errs = {}
    for dt in ("e4m3", "e5m2"):
        m = tiny_llama()
        quantize_(m, FP8Config.for_bits(8, dtype=dt))
        assert sum(isinstance(x, QuantLinear) for x in m.modules()) == 14
        errs[dt] = logit_mse(m, ref, test)
    assert errs["e4m3"] < errs["e5m2"], errs
    assert errs["e4m3"] < 1e-2 * float(ref.pow(2).mean()), errs  # relative output MSE under 1 %


def test_max_value_search_not_worse_than_absmax() -> None:
    g = torch.Generator().manual_seed(1)
    W = torch.distributions.StudentT(3.0).sample((32, 256))
    for name in ("e4m3", "e3m4", "e2m5"):
        plain = Minifloat.preset(name).quantize(W).dequantize()
        searched = Minifloat.preset(name, scale_search=True).quantize(W).dequantize()
        e_plain = (plain - W).pow(2).sum(1)
        e_search = (searched - W).pow(2).sum(1)
        assert bool((e_search <= e_plain + 1e-9).all()), name  # absmax (ratio 1) is one of the candidates
    del g


def test_choose_exponent_bits_follows_tails() -> None:
    torch.manual_seed(0)
    assert choose_exponent_bits(torch.randn(64, 64), n_grid=25) <= 3
    heavy = torch.distributions.StudentT(1.0).sample((64, 64))
    assert choose_exponent_bits(heavy, n_grid=25) >= choose_exponent_bits(torch.randn(64, 64), n_grid=25)


def test_registry_and_bad_options() -> None:
    assert get_method("fp8") is FP8Config and FP8Config.bits_choices == (8,)
    cfg = FP8Config.for_bits(8, dtype="e3m4", scale_search=True)
    assert cfg.format.exponent_bits == 3 and cfg.format.act == ActQuant("e4m3", "token")
    assert MethodConfig.from_dict(cfg.to_dict()) == cfg
    assert FP8Config.for_bits(8, act_dtype=None).format.act is None
    with pytest.raises(ConfigError, match="valid choices"):
        FP8Config.for_bits(8, dtype="e6m1")
    with pytest.raises(ConfigError, match="valid choices"):
        FP8Config.for_bits(4)
    with pytest.raises(ConfigError):
        FP8Config(format=Minifloat.preset("fp4"))


def test_gptq_rounding_stays_on_the_fp8_grid_and_lowers_the_output_error() -> None:
    g = torch.Generator().manual_seed(3)
    W = torch.randn(24, 96, generator=g)
    X = torch.randn(512, 96, generator=g) @ torch.randn(96, 96, generator=g)  # correlated inputs
    H = 2 * X.T @ X / 512
    for scale_search in (False, True):
        rtn = FP8Config.for_bits(8, scale_search=scale_search)
        cfg = FP8Config.for_bits(8, scale_search=scale_search, gptq=True)
        assert cfg.stats == ("hessian",) and rtn.stats == () and FP8Config.stats == ()
        q = cfg.quantize_weight(W, {"hessian": H})
        Q = q.dequantize()
        # every value is an E4M3 value times its channel's scale: re-rounding with the same scales moves nothing
        again = cfg.format.quantize(Q, scale=q["scale"]).dequantize()
        assert torch.equal(again, Q)
        assert not torch.equal(Q, rtn.quantize_weight(W).dequantize())  # GPTQ is not round-to-nearest
        out_err = lambda Wq: float((X @ (W - Wq).T).pow(2).sum())  # noqa: E731
        assert out_err(Q) < 0.8 * out_err(rtn.quantize_weight(W).dequantize()), scale_search
    with pytest.raises(Exception, match="hessian"):
        FP8Config.for_bits(8, gptq=True).quantize_weight(W, None)
    assert "gptq" in FP8Config.for_bits(8, gptq=True).describe()
    assert MethodConfig.from_dict(FP8Config.for_bits(8, gptq=True).to_dict()).stats == ("hessian",)


def test_gptq_fp8_end_to_end_beats_round_to_nearest() -> None:
    ids, test = token_ids(4, 32, 1), token_ids(4, 32, 2)
    with torch.no_grad():
        ref = tiny_llama()(test).logits
    errs = {}
    for gptq in (False, True):
        m = tiny_llama()
        cfg = FP8Config.for_bits(8, act_dtype=None, gptq=gptq)
        quantize_(m, cfg, calibration=ids if gptq else None)
        errs[gptq] = logit_mse(m, ref, test)
    assert errs[True] < errs[False], errs
