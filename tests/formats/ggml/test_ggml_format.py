"""GGML block types as lowbit Formats: registry, shapes, round trip, QuantLinear, RTN, imatrix parameter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowbit.formats  # noqa: F401  (registers every format)
from lowbit.formats.base import Format, format_from_spec, format_registry
from lowbit.formats.ggml import GGML_TYPES, dequantize_raw, quantize_raw
from lowbit.formats.ggml.format import GGMLFormat, Q4_K, Q8_0, ggml_format

NAMES = list(GGML_TYPES)


def test_every_type_is_a_registered_format_with_upstream_class_name():
    reg = format_registry()
    for name in NAMES:
        cls = reg[f"ggml_{name}"]
        assert issubclass(cls, GGMLFormat) and cls.__name__ == name
        assert cls.examples() == [cls()]
        assert format_from_spec(cls().spec()) == cls()


@pytest.mark.parametrize("name", NAMES)
def test_qdata_is_the_raw_blocks_and_bits_per_weight_is_exact(name):
    fmt = ggml_format(name)
    W = torch.randn(8, 512)
    q = fmt.quantize(W)
    t = GGML_TYPES[name]
    assert q["qdata"].dtype == torch.uint8 and tuple(q["qdata"].shape) == (8, 512 // t.block_size * t.type_size)
    assert np.array_equal(q["qdata"].numpy(), quantize_raw(W, name))
    assert q.bits_per_weight == pytest.approx(q["qdata"].numel() * 8 / W.numel())
    assert q.bits_per_weight == pytest.approx(fmt.bits_per_weight)
    torch.testing.assert_close(q.dequantize(), dequantize_raw(q["qdata"].numpy(), name, (8, 512)), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_fake_quantize_keeps_dtype_and_is_idempotent_where_the_reference_is(name):
    fmt = ggml_format(name)
    torch.manual_seed(10)  # a seed on which Q2_K's re-quantization moves values (it does for ~2 % of seeds)
    W = torch.randn(4, 256, dtype=torch.float64)
    Y = fmt.fake_quantize(W)
    assert Y.dtype == torch.float64 and Y.shape == W.shape
    if type(fmt).idempotent:
        torch.testing.assert_close(fmt.fake_quantize(Y), Y, rtol=0, atol=0)
    elif name == "Q2_K":
        assert not torch.equal(fmt.fake_quantize(Y), Y)  # why Q2_K is flagged: a real counterexample


def test_validate_shape_names_block_size_and_fitting_types():
    with pytest.raises(ValueError, match=r"blocks of 256; in_features=576.*Types that fit.*Q8_0"):
        Q4_K().validate_shape((4, 576))
    with pytest.raises(ValueError, match="2-D"):
        Q8_0().validate_shape((4,))
    Q8_0().validate_shape((4, 576))
    with pytest.raises(ValueError, match="valid choices"):
        ggml_format("Q7_K")


def test_imatrix_parameter_changes_the_search_and_lowers_weighted_error():
    torch.manual_seed(0)
    W = torch.randn(64, 512)
    imp = torch.rand(512) ** 4 * 10 + 1e-3
    plain = Q4_K().quantize(W)
    guided = Q4_K().quantize(W, act_sq_mean=imp)
    assert np.array_equal(guided["qdata"].numpy(), quantize_raw(W, "Q4_K", imatrix=imp))
    err = lambda q: float((((q.dequantize() - W) ** 2) * imp).sum())  # noqa: E731
    assert err(guided) < err(plain)
    with pytest.raises(ValueError, match="unknown Q4_K parameter"):
        Q4_K().quantize(W, scale=torch.ones(1))


def test_rtn_and_quantlinear_run_a_ggml_format():
    from lowbit.methods.rtn.api import RTNConfig
    from lowbit.quantize import quantize_

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(512, 32))
    W = m[0].weight.detach().clone()
    quantize_(m, RTNConfig(format=Q4_K()))
    x = torch.randn(5, 512)
    Wq = dequantize_raw(quantize_raw(W, "Q4_K"), "Q4_K", tuple(W.shape))
    torch.testing.assert_close(m(x), torch.nn.functional.linear(x, Wq, m[0].bias), rtol=1e-5, atol=1e-5)
    assert isinstance(Q4_K(), Format)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_given_parameters_round_to_nearest_and_fit_gptq(name):
    """Block types with one scale (and min) per 32 weights accept method-chosen parameters (GPTQ's fit/round);
    with the reference's own parameters the result is within one level of the reference's bytes."""
    from lowbit.methods.gptq.api import GPTQConfig

    fmt = ggml_format(name)
    torch.manual_seed(0)
    W = torch.randn(32, 128)
    assert fmt.params(W) == {}  # RTN's choice for a whole matrix: the reference quantizer itself
    slices = [fmt.params(W[:, j:j + 32]) for j in range(0, 128, 32)]
    p = {k: torch.cat([s[k] for s in slices], dim=1) for k in slices[0]}
    assert p["scale"].shape == (32, 4) and fmt.group_size == 32
    q = fmt.quantize(W, **p)
    ref = dequantize_raw(quantize_raw(W, name), name, (32, 128))
    step = p["scale"].repeat_interleave(32, dim=1).abs()
    assert bool(((q.dequantize() - ref).abs() <= step * 1.0001).all())
    # rounding to nearest under given parameters: error at most half a step (inside the grid)
    assert bool(((q.dequantize() - W).abs() <= step * 0.5 + 1e-6)[:, :].float().mean() > 0.99)
    col = fmt.fake_quantize(W[:, 5:6], **{k: v[:, :1] for k, v in p.items()})
    torch.testing.assert_close(col, q.dequantize()[:, 5:6], rtol=0, atol=0)
    X = torch.randn(512, 128) * torch.linspace(0.1, 3, 128)
    H = 2 * X.T @ X / 512
    g = GPTQConfig(format=fmt).quantize_weight(W, {"hessian": H})
    err = lambda Q: float(((X @ (Q - W).T) ** 2).sum())  # noqa: E731
    assert err(g.dequantize()) <= err(fmt.quantize(W).dequantize())
    assert g["qdata"].dtype == torch.uint8 and g["qdata"].shape == quantize_raw(W, name).shape


def test_types_without_block_parameters_refuse_gptq():
    from lowbit.methods.gptq.api import GPTQConfig

    assert Q4_K().params(torch.randn(4, 32)) == {} and Q4_K().group_size is None
    with pytest.raises(ValueError):
        GPTQConfig(format=Q4_K()).quantize_weight(torch.randn(4, 256), {"hessian": torch.eye(256)})
    with pytest.raises(ValueError, match="unknown Q4_K parameter"):
        Q4_K().quantize(torch.randn(4, 256), scale=torch.ones(4, 1))
