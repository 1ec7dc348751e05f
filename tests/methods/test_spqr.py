"""SpQR: leave-one-out criterion vs a brute-force reference, outliers, exact bits, relation to GPTQ."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.config import ConfigError
from lowbit.formats.affine import IntAffine
from lowbit.formats.bilevel import BilevelAffine
from lowbit.formats.outliers import Outliers
from lowbit.methods.base import get_method
from lowbit.methods.gptq import GPTQConfig
from lowbit.methods.spqr import SpQRConfig
from lowbit.methods.spqr.core import average_bits, leave_one_out_reduction


def layer(out: int = 64, inp: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=gen) * 0.02
    W[torch.rand(out, inp, generator=gen) < 0.003] *= 25  # heavy-tailed, like LLM weights
    X = torch.randn(8 * inp, inp, generator=gen) @ (torch.eye(inp) + torch.randn(inp, inp, generator=gen) / inp ** .5)
    return W, 2 * X.T @ X / X.shape[0]


def herr(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    D = (W - Q).double()
    return float(torch.trace(D @ H.double() @ D.T))


def test_leave_one_out_matches_brute_force_float64() -> None:
    gen = torch.Generator().manual_seed(1)
    Wg = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    u = torch.rand(8, generator=gen, dtype=torch.float64) + 0.5

    def err(x: torch.Tensor, uu: torch.Tensor) -> float:
        lo, hi = float(x.min()), float(x.max())
        s = (hi - lo) / 7
        z = -lo / s
        q = (torch.clamp(torch.round(x / s + z), 0, 7) - z) * s
        return float((((q - x) / uu) ** 2).sum())

    ref = torch.zeros_like(Wg)
    for i in range(5):
        for k in range(8):
            keep = [c for c in range(8) if c != k]
            ref[i, k] = err(Wg[i], u) - err(Wg[i, keep], u[keep])
    torch.testing.assert_close(leave_one_out_reduction(Wg, u, 3), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(64, 128), (32, 576)])
def test_bits_per_weight_formula_matches_stored_bytes(shape: tuple[int, int]) -> None:
    W, H = layer(*shape)
    for bits in (3, 4):
        q = SpQRConfig.for_bits(bits).quantize_weight(W, {"hessian": H})
        k = q["outlier_val"].numel()
        assert k > 0
        stored = sum(t.numel() * t.element_size() for t in q.data.values()) * 8 / W.numel()
        assert q.bits_per_weight == stored
        assert q.bits_per_weight == pytest.approx(average_bits(bits, 16, 3, 16, shape, k), rel=0, abs=1e-12)
        # the paper's 3.625 / 4.625 + 32·p, plus our 16 bits per row of outlier counts
        assert q.bits_per_weight == pytest.approx(bits + 0.625 + 32 * k / W.numel() + 16 / shape[1], abs=1e-12)


def test_bits_formula_on_the_default_models_widest_rows() -> None:
    """The format alone (no sweep) at 1536-wide rows: stored bytes equal the formula for any outlier count."""
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(32, 1536, generator=gen)
    fmt = Outliers(base=BilevelAffine(bits=3))
    for p in (0.0, 0.004, 0.01):
        mask = torch.rand(W.shape, generator=gen) < p
        q = fmt.quantize(W, outlier_mask=mask)
        assert q.bits_per_weight == pytest.approx(average_bits(3, 16, 3, 16, (32, 1536), int(mask.sum())), abs=1e-12)
        assert torch.equal(q.dequantize()[mask], W[mask].half().float())


def test_without_outliers_spqr_is_gptq_on_the_bilevel_format() -> None:
    W, H = layer()
    spqr = SpQRConfig(outlier_threshold=math.inf).quantize_weight(W, {"hessian": H})
    gptq = GPTQConfig(format=BilevelAffine(bits=3)).quantize_weight(W, {"hessian": H})
    assert spqr["outlier_val"].numel() == 0
    assert torch.equal(spqr.dequantize(), gptq.dequantize())


def test_outliers_lower_the_hessian_weighted_error_and_beat_gptq_g128() -> None:
    W, H = layer()
    dense = SpQRConfig(outlier_threshold=math.inf).quantize_weight(W, {"hessian": H})
    sparse = SpQRConfig().quantize_weight(W, {"hessian": H})
    g128 = GPTQConfig(format=IntAffine(bits=3, group_size=128)).quantize_weight(W, {"hessian": H})
    e_dense, e_sparse, e_g128 = (herr(W, q.dequantize(), H) for q in (dense, sparse, g128))
    assert e_sparse < e_dense < e_g128, (e_sparse, e_dense, e_g128)


def test_planted_outlier_is_kept_in_16_bits() -> None:
    W, H = layer(seed=3)
    W[7, 40] = 3.0  # 150 standard deviations
    q = SpQRConfig().quantize_weight(W, {"hessian": H})
    Wd = q.dequantize()
    # the weight kept is the GPTQ-updated one, in fp16; it must not be clamped onto the group's grid
    assert abs(float(Wd[7, 40]) - 3.0) < 0.2
    assert float(Wd[7, 40]) == float(Wd[7, 40].half())
    counts = q["outlier_idx"][:64].long()
    assert counts[7] >= 1


def test_config_registry_and_validation() -> None:
    assert get_method("spqr") is SpQRConfig
    c = SpQRConfig.for_bits(3)
    assert c.format == Outliers(base=BilevelAffine(bits=3, group_size=16, stat_bits=3, stat_group_size=16))
    assert SpQRConfig.from_dict(c.to_dict()) == c
    with pytest.raises(TypeError, match="BilevelAffine"):
        SpQRConfig(format=IntAffine(bits=3))
    with pytest.raises(ConfigError, match="outlier_threshold"):
        SpQRConfig(outlier_threshold=0)
    with pytest.raises(ValueError, match="hessian"):
        c.quantize_weight(torch.randn(4, 16), {})


def test_spqr_model_round_trips_through_save_and_load(tmp_path) -> None:  # noqa: ANN001
    import transformers

    from lowbit.io.checkpoint import load, save
    from lowbit.nn.linear import QuantLinear
    from lowbit.quantize import quantize_

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(0))
    method = SpQRConfig.for_bits(3)
    quantize_(model, method, calibration=ids)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 7
    with torch.no_grad():
        ref = model(ids).logits
    save(model, tmp_path / "spqr", method=method)
    back = load(tmp_path / "spqr")
    assert isinstance(back.model.layers[0].mlp.down_proj.format, Outliers)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref, rtol=0, atol=0)


def test_column_rounder_equals_the_formats_fake_quantize_on_one_column() -> None:
    from lowbit.formats.affine import IntAffine
    from lowbit.formats.bilevel import BilevelAffine
    from lowbit.methods.gptq.api import _column_rounder, affine_column_rounder

    g = torch.Generator().manual_seed(5)
    W = torch.randn(48, 16, generator=g)
    W[3, 5] = 9.0  # a value far outside its group's range: clamped the same way by both
    base = BilevelAffine(bits=3, group_size=16, stat_bits=3, stat_group_size=16)
    p = base.params(W)
    rnd = affine_column_rounder(float((1 << base.bits) - 1), lambda q: base.stats(q, W.shape[0]))
    shifted = W + 0.01 * torch.randn(W.shape, generator=g)  # GPTQ rounds updated columns with the fitted params
    for j in range(W.shape[1]):
        col = shifted[:, j:j + 1]
        assert torch.equal(rnd(col, p), base.fake_quantize(col, **p))
    for fmt in (IntAffine(4, group_size=16), IntAffine(3, group_size=16, symmetric=True)):
        p = fmt.params(W)
        r = _column_rounder(fmt)
        for j in range(W.shape[1]):
            col = shifted[:, j:j + 1]
            assert torch.equal(r(col, p, j, None), fmt.fake_quantize(col, **p))
