"""SmoothQuant: exact smoothing transform (float64), the factor formula, W8A8 O1-O3 through the int8 path,
and the outlier model on which smoothing beats naive W8A8."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.config import ConfigError
from lowbit.formats.act_quant import ActQuant, act_linear
from lowbit.formats.int8_rowwise import Int8Rowwise
from lowbit.methods.base import MethodConfig, get_method
from lowbit.methods.smoothquant import SmoothQuantConfig
from lowbit.methods.smoothquant.api import LEVELS, smooth_block
from lowbit.methods.smoothquant.core import smoothing_factors
from lowbit.nn.linear import QuantLinear
from lowbit.quantize import quantize_
from tests.methods.act_aware_helpers import logit_mse, tiny_llama, token_ids


def test_smoothing_leaves_block_outputs_unchanged_float64() -> None:
    model = tiny_llama(dtype=torch.float64, outliers=20.0)
    ids = token_ids(2, 16, 0)
    with torch.no_grad():
        ref = model(ids).logits
    g = torch.Generator().manual_seed(1)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"]
    for blk in model.model.layers:
        amax = {n: torch.rand(64, generator=g, dtype=torch.float64) * 30 + 0.01 for n in names}
        before = blk.input_layernorm.weight.clone()
        assert smooth_block(blk, amax, alpha=0.8) == ["input_layernorm", "post_attention_layernorm"]
        assert not torch.equal(before, blk.input_layernorm.weight)  # it did change the weights
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_smoothing_factors_match_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(32, generator=g) * 10
    Ws = [torch.randn(16, 32, generator=g), torch.randn(8, 32, generator=g) * 3]
    for alpha in (0.0, 0.5, 0.85, 1.0):
        s = smoothing_factors(a, Ws, alpha)
        wmax = torch.maximum(Ws[0].abs().amax(0), Ws[1].abs().amax(0))
        ref = a.double().clamp(min=1e-5) ** alpha / wmax.double() ** (1 - alpha)
        torch.testing.assert_close(s.double(), ref.clamp(min=1e-5), rtol=1e-5, atol=0)
    # α = 0.5 equalises the per-channel maxima of X/s and W·s
    s = smoothing_factors(a, Ws, 0.5)
    torch.testing.assert_close(a / s, wmax * s, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(a, Ws, 1.5)


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
def test_int8_path_agrees_with_float_reference(level: str) -> None:
    g = torch.Generator().manual_seed(4)
    W, x = torch.randn(48, 96, generator=g), torch.randn(3, 40, 96, generator=g) * 2
    fmt = LEVELS[level]
    params = {"act_scale": torch.tensor(float(x.abs().max()) / 127)} if level == "O3" else {}
    q = fmt.quantize(W, **params)
    lin = QuantLinear(q, torch.randn(48, generator=g))
    y = lin(x)
    ref = act_linear(x, q.dequantize(), lin.bias, fmt.act, q.get("act_scale"))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    # integer inputs at scale 1 are exact in both paths: the int32 GEMM equals the float matmul
    xi = torch.randint(-127, 128, (64, 96), generator=g).float()
    qi = Int8Rowwise(granularity="channel", act=ActQuant("int8", "tensor", static=True)).quantize(
        torch.randint(-127, 128, (48, 96), generator=g).float(), scale=torch.ones(48), act_scale=torch.ones(1))
    assert torch.equal(QuantLinear(qi)(xi), xi @ qi.dequantize().T)


def test_levels_store_what_they_say() -> None:
    W = torch.randn(16, 32)
    assert LEVELS["O1"].quantize(W)["scale"].shape == (16,)
    assert LEVELS["O2"].quantize(W)["scale"].shape == (1,)
    q3 = LEVELS["O3"].quantize(W, act_scale=torch.tensor(0.5))
    assert q3.format.tensor_names() == ("qdata", "scale", "act_scale") and float(q3["act_scale"]) == 0.5
    with pytest.raises(ValueError, match="act_scale"):
        LEVELS["O3"].quantize(W)


def test_smoothquant_beats_naive_w8a8_on_outlier_model_and_all_levels_run() -> None:
    ids, test = token_ids(8, 32, 1), token_ids(4, 32, 2)
    with torch.no_grad():
        ref = tiny_llama(outliers=20.0)(test).logits
    errs = {}
    for key, kw in {"naive": {"smooth": False}, "O1": {}, "O2": {"level": "O2"}, "O3": {"level": "O3"}}.items():
        m = tiny_llama(outliers=20.0)
        quantize_(m, SmoothQuantConfig.for_bits(8, **kw), calibration=ids)
        assert sum(isinstance(x, QuantLinear) for x in m.modules()) == 14
        errs[key] = logit_mse(m, ref, test)
    assert errs["O1"] * 10 < errs["naive"], errs  # a wide margin
    assert errs["O1"] <= errs["O2"] * 1.05 and errs["O3"] < errs["naive"], errs


def test_registry_options_and_bad_input() -> None:
    assert get_method("smoothquant") is SmoothQuantConfig and SmoothQuantConfig.bits_choices == (8,)
    cfg = SmoothQuantConfig.for_bits(8, level="o3", alpha=0.85)
    assert cfg.format == LEVELS["O3"] and cfg.alpha == 0.85
    assert MethodConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="valid choices"):
        SmoothQuantConfig.for_bits(4)
    with pytest.raises(ConfigError, match="valid choices"):
        SmoothQuantConfig.for_bits(8, level="O4")
    with pytest.raises(ConfigError, match="alpha"):
        SmoothQuantConfig(alpha=2.0)
    with pytest.raises(ConfigError):
        SmoothQuantConfig(format=Int8Rowwise())  # no activation quantization
    with pytest.raises(ValueError, match="calibration"):
        quantize_(nn.Sequential(nn.Linear(4, 4)), SmoothQuantConfig())
