"""ZeroQuant-FP: LoRC is the truncated SVD of the error and its bytes are counted, power-of-two scales make
FP4 → FP8 exact, GPTQ rounds through the FP4 format, and W4A8 with LoRC beats W4A8 without."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lowbit.config import ConfigError
from lowbit.formats.act_quant import ActQuant
from lowbit.formats.minifloat import Minifloat, MinifloatGrid, round_to_grid
from lowbit.methods.base import MethodConfig, get_method
from lowbit.methods.zeroquant_fp import ZeroQuantFPConfig
from lowbit.methods.zeroquant_fp.core import lorc
from lowbit.nn.linear import QuantLinear
from lowbit.quantize import quantize_
from tests.methods.act_aware_helpers import logit_mse, tiny_llama, token_ids

E4M3 = MinifloatGrid(4, 3, "fn")


def test_lorc_is_the_truncated_svd_of_the_error() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 80, generator=g)
    W_hat = Minifloat.preset("fp4", granularity="group", group_size=16).fake_quantize(W)
    U, V = lorc(W, W_hat, 6)
    E = (W - W_hat).double()
    S = torch.linalg.svdvals(E)
    resid = float((E - (U @ V).double()).pow(2).sum())
    assert resid == pytest.approx(float(S[6:].pow(2).sum()), rel=1e-5)  # Eckart-Young optimum
    with pytest.raises(ValueError, match="rank"):
        lorc(W, W_hat, 0)


def test_lorc_bytes_counted_and_error_reduced() -> None:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 256, generator=g)
    base = ZeroQuantFPConfig.for_bits(4, 128, gptq=False, lorc_rank=0)
    with_lorc = ZeroQuantFPConfig.for_bits(4, 128, gptq=False, lorc_rank=8)
    q0, q8 = base.quantize_weight(W), with_lorc.quantize_weight(W)
    assert q8.bits_per_weight - q0.bits_per_weight == pytest.approx(8 * 2 * 8 * (64 + 256) / (64 * 256))
    assert float((q8.dequantize() - W).pow(2).sum()) < float((q0.dequantize() - W).pow(2).sum())
    # the FP4 codes are those without LoRC: LoRC only adds the correction
    assert torch.equal(q8["qdata"], q0["qdata"])


@pytest.mark.parametrize("pow2", ["ceil", "row"])
def test_power_of_two_scales_cast_fp4_to_fp8_exactly(pow2: str) -> None:
    g = torch.Generator().manual_seed(2)
    W = torch.randn(32, 256, generator=g) * torch.rand(32, 1, generator=g)
    fmt = Minifloat.preset("fp4", granularity="group", group_size=64, pow2_scale=pow2)
    q = fmt.quantize(W)
    # the FP8 GEMM sees FP4 values times the group scale over one per-row (M2) or per-tensor (M1) scale
    ref = q["scale"].amax(dim=1, keepdim=True) if pow2 == "row" else q["scale"].max()
    fp4_vals = fmt.grid.decode(fmt.codes(q))
    shifted = fp4_vals * (q["scale"] / ref).repeat_interleave(64, dim=1)
    assert torch.equal(round_to_grid(shifted, E4M3), shifted)
    # without the constraint the same cast is not exact
    free = Minifloat.preset("fp4", granularity="group", group_size=64)
    qf = free.quantize(W)
    ratio = (qf["scale"] / qf["scale"].amax(dim=1, keepdim=True)).repeat_interleave(64, dim=1)
    vals = free.grid.decode(free.codes(qf)) * ratio
    assert not torch.equal(round_to_grid(vals, E4M3), vals)


def test_gptq_rounds_through_fp4_and_lorc_helps_end_to_end() -> None:
    ids, test = token_ids(4, 32, 1), token_ids(4, 32, 2)
    with torch.no_grad():
        ref = tiny_llama()(test).logits
    errs = {}
    for rank in (8, 0):
        m = tiny_llama()
        cfg = ZeroQuantFPConfig.for_bits(4, 32, lorc_rank=rank)
        quantize_(m, cfg, calibration=ids)
        qls = [x for x in m.modules() if isinstance(x, QuantLinear)]
        assert len(qls) == 14 and all(q.format.pow2_scale == "ceil" for q in qls)
        errs[rank] = logit_mse(m, ref, test)
    assert errs[8] < errs[0], errs
    # GPTQ through the format is not RTN: the same weights rounded to nearest differ
    from lowbit.methods.gptq.api import quantize_with_hessian

    g = torch.Generator().manual_seed(5)
    W = torch.randn(16, 64, generator=g)
    X = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)
    H = 2 * X.T @ X / 256
    fmt = Minifloat.preset("fp4", granularity="group", group_size=32, pow2_scale="ceil")
    qg = quantize_with_hessian(fmt, W, H, damp=0.01, block_size=128, act_order=False, static_groups=False)
    herr = lambda Q: float(torch.trace((W - Q) @ H @ (W - Q).T))  # noqa: E731
    assert herr(qg.dequantize()) < herr(fmt.fake_quantize(W))


def test_registry_and_bad_options() -> None:
    assert get_method("zeroquant_fp") is ZeroQuantFPConfig and ZeroQuantFPConfig.bits_choices == (4,)
    cfg = ZeroQuantFPConfig.for_bits(4)
    assert cfg.format.act == ActQuant("e4m3", "token") and cfg.format.lorc_rank == 8 and cfg.gptq
    assert MethodConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="GPTQ"):
        ZeroQuantFPConfig.for_bits(4, pow2_scale="row")
    assert ZeroQuantFPConfig.for_bits(4, pow2_scale="row", gptq=False).format.pow2_scale == "row"
    with pytest.raises(ConfigError, match="valid choices"):
        ZeroQuantFPConfig.for_bits(8)
    with pytest.raises(ConfigError, match="valid"):
        ZeroQuantFPConfig.for_bits(4, rank=4)
    with pytest.raises(ValueError, match="lora"):
        dataclasses.replace(cfg.format, act=None).quantize(torch.randn(16, 32))  # LoRC factors not given


def test_lorc_is_the_truncated_svd_for_tall_wide_and_exact_low_rank_errors() -> None:
    g = torch.Generator().manual_seed(3)
    for shape in ((40, 96), (96, 40)):
        W = torch.randn(*shape, generator=g)
        W_hat = W - torch.randn(shape[0], 2, generator=g) @ torch.randn(2, shape[1], generator=g)  # rank-2 error
        U, V = lorc(W, W_hat, 4)  # asks for more than the error's rank: the extra pairs must be zero, not NaN
        assert U.shape == (shape[0], 4) and V.shape == (4, shape[1])
        assert torch.isfinite(U).all() and torch.isfinite(V).all()
        E = (W - W_hat).double()
        assert torch.allclose((U @ V).double(), E, atol=1e-4)
        W_hat = Minifloat.preset("fp4", granularity="group", group_size=16).fake_quantize(W)
        U, V = lorc(W, W_hat, 5)
        E = (W - W_hat).double()
        S = torch.linalg.svdvals(E)
        resid = float((E - (U @ V).double()).pow(2).sum())
        assert resid == pytest.approx(float(S[5:].pow(2).sum()), rel=1e-5)
