"""LLM.int8(): parity with bitsandbytes' vector-wise quantization and mixed matmul, the float64 textbook
decomposition, the outlier model (threshold 6 close to float, threshold 0 degrades), and LoRA on top."""

from __future__ import annotations

import pytest
import torch

from lowbit.config import ConfigError
from lowbit.formats.act_quant import ActQuant
from lowbit.formats.int8_rowwise import Int8Rowwise, int8_mixed_linear
from lowbit.methods.base import MethodConfig, get_method
from lowbit.methods.llm_int8 import LLMInt8Config
from lowbit.methods.llm_int8.core import int8_decomposed_matmul, outlier_features
from lowbit.nn.linear import QuantLinear
from lowbit.quantize import quantize_
from tests.methods.act_aware_helpers import logit_mse, tiny_llama, token_ids

bnb = pytest.importorskip("bitsandbytes")


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(40, 128, generator=g)
    X[:, [7, 90]] *= 25  # two outlier feature columns
    return X, torch.randn(48, 128, generator=g) * 0.05


def test_weight_quantization_equals_bitsandbytes() -> None:
    _, W = _inputs()
    CB, SCB, _ = bnb.functional.int8_vectorwise_quant(W.clone())
    q = LLMInt8Config().quantize_weight(W)
    assert torch.equal(q["qdata"], CB)
    torch.testing.assert_close(q["scale"] * 127, SCB, rtol=1e-6, atol=0)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_mixed_matmul_matches_bitsandbytes(threshold: float) -> None:
    X, W = _inputs(1)
    CA, SCA, cols = bnb.functional.int8_vectorwise_quant(X.clone(), threshold=threshold)
    CB, SCB, _ = bnb.functional.int8_vectorwise_quant(W.clone())
    ref, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm(X, CA, CB, SCA, SCB, cols, None)
    if threshold:
        assert sorted(cols.tolist()) == [7, 90]
    q = LLMInt8Config.for_bits(8, threshold=threshold).quantize_weight(W)
    y = QuantLinear(q)(X)
    torch.testing.assert_close(y, ref.to(y.dtype), rtol=1e-4, atol=1e-4)


def test_decomposition_close_to_paper_float64_reference() -> None:
    X, W = _inputs(2)
    assert outlier_features(X, 6.0).tolist() == [7, 90] and outlier_features(X, 0.0).numel() == 0
    exact = X.double() @ W.double().T
    paper = int8_decomposed_matmul(X, W, 6.0)
    ours = int8_mixed_linear(X, LLMInt8Config().quantize_weight(W)["qdata"], LLMInt8Config().quantize_weight(W)["scale"], 6.0)
    plain = int8_decomposed_matmul(X, W, 0.0)
    err = lambda Y: float((Y.double() - exact).pow(2).mean())  # noqa: E731
    # bitsandbytes-style outlier weights (dequantized int8) are within a small factor of the paper's float ones,
    # and both are far better than no decomposition on inputs with outlier features
    assert err(paper) <= err(ours) * 1.5 and err(ours) * 10 < err(plain), (err(paper), err(ours), err(plain))


def test_threshold_6_stays_close_threshold_0_degrades_on_outlier_model() -> None:
    test = token_ids(4, 32, 2)
    with torch.no_grad():
        ref = tiny_llama(outliers=20.0)(test).logits
    errs = {}
    for t in (6.0, 0.0):
        m = tiny_llama(outliers=20.0)
        quantize_(m, LLMInt8Config.for_bits(8, threshold=t))
        assert sum(isinstance(x, QuantLinear) for x in m.modules()) == 14
        errs[t] = logit_mse(m, ref, test)
    plain = tiny_llama()
    with torch.no_grad():
        ref_plain = plain(test).logits
    quantize_(plain, LLMInt8Config.for_bits(8, threshold=0.0))
    base = logit_mse(plain, ref_plain, test)  # int8 error of the same model without outliers
    assert errs[6.0] * 4 < errs[0.0], errs
    assert errs[6.0] < 10 * base, (errs, base)


def test_frozen_base_for_lora_passes_gradients_to_input_and_adapters() -> None:
    from lowbit.nn.lora import LoRASpec, add_lora, lora_parameters

    g = torch.Generator().manual_seed(3)
    W = torch.randn(24, 32, generator=g)
    q = LLMInt8Config().quantize_weight(W)
    lin = QuantLinear(q)
    x = (torch.randn(5, 32, generator=g) * 10).requires_grad_(True)
    y = lin(x)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, torch.ones(5, 24) @ q.dequantize(), rtol=1e-5, atol=1e-5)
    m = tiny_llama()
    quantize_(m, LLMInt8Config())
    add_lora(m, LoRASpec(r=4))
    params = lora_parameters(m)
    assert params and all(p.requires_grad for p in params)
    out = m(token_ids(2, 16, 4), labels=token_ids(2, 16, 4))
    out.loss.backward()
    assert all(p.grad is not None for p in params)
    assert any(float(p.grad.abs().sum()) > 0 for p in params)


def test_registry_and_bad_options() -> None:
    assert get_method("llm_int8") is LLMInt8Config and LLMInt8Config.bits_choices == (8,) and LLMInt8Config.stats == ()
    cfg = LLMInt8Config.for_bits(8, threshold=4.0)
    assert cfg.format.threshold == 4.0 and MethodConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="valid choices"):
        LLMInt8Config.for_bits(4)
    with pytest.raises(ConfigError, match="valid"):
        LLMInt8Config.for_bits(8, treshold=6.0)
    with pytest.raises(ValueError, match="threshold"):
        Int8Rowwise(threshold=6.0)  # decomposition needs int8 per-token activations
    with pytest.raises(ValueError, match="threshold"):
        Int8Rowwise(act=ActQuant("int8", "token"), threshold=-1.0)
    with pytest.raises(ConfigError):
        LLMInt8Config(format=Int8Rowwise())
