"""RTN: any format, for_bits defaults, quantize_ on a tiny Llama, errors."""

import pytest
import torch
from torch import nn

from lowbit.formats.affine import IntAffine
from lowbit.formats.codebook import Codebook, RowCodebook
from lowbit.formats.fp8 import FP8
from lowbit.methods import get_method
from lowbit.methods.base import MethodConfig
from lowbit.methods.rtn import RTNConfig
from lowbit.nn.linear import QuantLinear
from lowbit.quantize import quantize_


def _tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("fmt", [IntAffine(4, 128), IntAffine(3, 32, symmetric=True), Codebook("nf4", 64, False),
                                 RowCodebook(3), FP8("e4m3")], ids=str)
def test_rtn_is_the_formats_nearest_rounding(fmt):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 200, generator=g) * 0.05
    q = RTNConfig(format=fmt).quantize_weight(W)
    assert q.format == fmt
    assert torch.equal(q.dequantize(), fmt.quantize(W, **fmt.params(W)).dequantize())


def test_for_bits_defaults():
    assert get_method("rtn") is RTNConfig
    assert RTNConfig.for_bits(4).format == IntAffine(bits=4, group_size=128, symmetric=False)
    assert RTNConfig.for_bits(3, 64).format == IntAffine(bits=3, group_size=64)
    assert RTNConfig.for_bits(8, symmetric=True).format.symmetric
    for bad in (1, 9, 0):
        with pytest.raises(ValueError, match=f"bits={bad}"):
            RTNConfig.for_bits(bad)
    with pytest.raises(TypeError, match="Format"):
        RTNConfig(format="int4")


def test_config_roundtrip_through_json_dict():
    cfg = RTNConfig(format=IntAffine(bits=5, group_size=None, float_zero_point=True, scale_dtype=torch.float32))
    back = MethodConfig.from_dict(cfg.to_dict())
    assert back == cfg and isinstance(back, RTNConfig)


def test_quantize_tiny_llama_replaces_linears_and_keeps_outputs_close():
    model = _tiny_llama()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    quantize_(model, RTNConfig.for_bits(8, 32))
    qlin = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qlin) == 2 * 7 and not any(type(m) is nn.Linear for n, m in model.named_modules() if "layers" in n)
    with torch.no_grad():
        out = model(ids).logits
    # 8-bit RTN: logits move by a small fraction of their spread
    assert float((out - ref).abs().max()) < 0.05 * float(ref.std())
    model4 = _tiny_llama()
    quantize_(model4, RTNConfig.for_bits(2, 32))
    with torch.no_grad():
        out2 = model4(ids).logits
    assert float((out2 - ref).abs().mean()) > float((out - ref).abs().mean())


def test_bad_weight():
    W = torch.randn(4, 64)
    W[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        RTNConfig().quantize_weight(W)
