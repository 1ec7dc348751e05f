"""NF4 / FP4 (QLoRA storage): configs, the NF4 construction from normal quantiles, constants' memory."""

import pytest
import torch

from lowbit.formats.codebook import Codebook, code_table
from lowbit.methods import get_method
from lowbit.methods.base import MethodConfig
from lowbit.methods.nf4 import FP4Config, NF4Config
from lowbit.methods.nf4.core import constants_bits_per_weight, normal_float_values


def test_nf4_values_are_normal_quantiles():
    # eq. 4 of arXiv 2305.14314 recomputed with torch's inverse normal CDF reproduces bnb's 16 float32 values
    assert torch.equal(normal_float_values(4), code_table("nf4"))
    for bits in (2, 3, 5):
        v = normal_float_values(bits)
        assert v.shape == (2 ** bits,) and v[0] == -1 and v[-1] == 1 and (v == 0).sum() == 1
        assert bool((v[1:] > v[:-1]).all())
    with pytest.raises(ValueError, match="2..8"):
        normal_float_values(1)


def test_double_quant_memory_matches_the_paper():
    # §3: 32/64 = 0.5 bits per parameter without, 8/64 + 32/(64*256) = 0.127 with double quantization
    assert constants_bits_per_weight(64, False) == 0.5
    assert constants_bits_per_weight(64, True) == pytest.approx(0.127, abs=5e-4)
    W = torch.randn(576, 1536)
    for dq in (False, True):
        q = NF4Config(format=Codebook("nf4", 64, dq)).quantize_weight(W)
        offset_bits = 32 / W.numel() if dq else 0.0
        assert q.bits_per_weight == pytest.approx(4 + constants_bits_per_weight(64, dq) + offset_bits, abs=1e-9)


def test_configs_and_registry():
    assert get_method("nf4") is NF4Config and get_method("fp4") is FP4Config
    assert NF4Config().format == Codebook("nf4", 64, True, 256)
    assert FP4Config().format == Codebook("fp4", 64, True, 256)
    assert NF4Config.for_bits(4, 128).format.block_size == 128
    assert NF4Config.for_bits(4, double_quant=False).format.double_quant is False
    for cfg in (NF4Config(), FP4Config()):
        assert MethodConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"bits=3.*\[4\]"):
        NF4Config.for_bits(3)
    with pytest.raises(ValueError, match="nf4"):
        NF4Config(format=Codebook("fp4"))
    with pytest.raises(ValueError, match="fp4"):
        FP4Config(format=Codebook("nf4"))


def test_quantize_weight_is_codebook_storage():
    W = torch.randn(64, 300) * 0.02
    q = NF4Config().quantize_weight(W)
    assert torch.equal(q["qdata"], Codebook("nf4").quantize(W)["qdata"])
    assert q.dequantize().dtype == W.dtype
    # NF4 beats FP4 on normal weights (QLoRA Table 2 direction); relative mean errors about 0.091 and 0.121
    e_nf4 = (q.dequantize() - W).abs().mean() / W.abs().mean()
    e_fp4 = (FP4Config().quantize_weight(W).dequantize() - W).abs().mean() / W.abs().mean()
    assert e_nf4 < 0.1 and e_fp4 < 0.135 and e_nf4 < e_fp4
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        NF4Config().quantize_weight(W)
