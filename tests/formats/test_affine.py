"""IntAffine against float64 textbook references: grouping, half-step error, given params, g_idx, errors."""

import math

import pytest
import torch

from lowbit.config import ConfigError
from lowbit.formats.affine import IntAffine
from lowbit.formats.base import Format
from lowbit.formats.bitpack import unpack


def _w(shape, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float() * scale


def _groups(fmt, n):
    if fmt.per_tensor or fmt.group_size is None:
        return torch.zeros(n, dtype=torch.long)
    return torch.arange(n) // fmt.group_size


def _ref_params(W, fmt):
    """Float64 textbook min/max params per group, from explicit column slices (no reshapes)."""
    W = W.double()
    out, n = W.shape
    grp = _groups(fmt, n)
    ng = int(grp.max()) + 1
    rows = 1 if fmt.per_tensor else out
    lo = torch.empty(rows, ng, dtype=torch.float64)
    hi = torch.empty(rows, ng, dtype=torch.float64)
    for k in range(ng):
        cols = W[:, grp == k]
        if fmt.per_tensor:
            lo[0, k], hi[0, k] = cols.min(), cols.max()
        else:
            lo[:, k], hi[:, k] = cols.min(1).values, cols.max(1).values
    return lo, hi


ASYM = [IntAffine(bits=b, group_size=g) for b in (2, 3, 4, 5, 8) for g in (32, 128, None)]
ALL = ASYM + [IntAffine(bits=4, group_size=64, symmetric=True), IntAffine(bits=3, group_size=None, symmetric=True),
              IntAffine(bits=4, group_size=128, float_zero_point=True), IntAffine(bits=2, per_tensor=True),
              IntAffine(bits=4, group_size=100, scale_dtype=torch.float32)]


@pytest.mark.parametrize("fmt", ALL, ids=str)
@pytest.mark.parametrize("shape", [(8, 576), (5, 1536), (3, 77)])
def test_rtn_error_at_most_half_a_step(fmt, shape):
    W = _w(shape, seed=shape[1])
    q = fmt.quantize(W)
    err = (q.dequantize().double() - W.double()).abs()
    step = q["scale"].double()
    step = step.expand(shape[0], -1) if fmt.per_tensor else step
    per_col = step[:, _groups(fmt, shape[1])] if not fmt.per_tensor else step.expand(shape[0], shape[1])
    assert bool((err <= 0.5 * per_col * (1 + 1e-5) + 1e-9).all()), float((err / per_col).max())


@pytest.mark.parametrize("fmt", ASYM, ids=str)
def test_params_match_float64_min_max_with_zero_in_range(fmt):
    W = _w((6, 600), seed=3)
    p = fmt.params(W)
    lo, hi = _ref_params(W, fmt)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    ref_scale = (hi - lo) / fmt.qmax
    s = p["scale"].double()
    assert p["scale"].dtype == torch.float16 and p["zero_point"].dtype == torch.uint8
    assert s.shape == (6, fmt.n_groups(600))
    # the stored scale is the fp16 value just at or above the exact one (rounded up)
    assert bool((s >= ref_scale).all()) and bool((s <= ref_scale * (1 + 2 ** -10)).all())
    assert torch.equal(p["zero_point"].double(), (-lo / s).round().clamp(0, fmt.qmax))


def test_codes_equal_float64_reference():
    fmt = IntAffine(bits=4, group_size=128)
    W = _w((16, 576), seed=5)
    q = fmt.quantize(W)
    s, z = q["scale"].double(), q["zero_point"].double()
    grp = _groups(fmt, 576)
    x = W.double() / s[:, grp] + z[:, grp]
    ref = x.round().clamp(0, 15)
    codes = unpack(q["qdata"], 4, 576).double()
    near_tie = ((x - x.floor()) - 0.5).abs() < 1e-4  # float32 vs float64 may round a near-tie differently
    assert torch.equal(codes[~near_tie], ref[~near_tie])
    assert bool(((codes - ref).abs() <= 1).all())
    deq = (ref - z[:, grp]) * s[:, grp]
    torch.testing.assert_close(q.dequantize().double()[~near_tie], deq[~near_tie], rtol=1e-6, atol=1e-7)


def test_short_last_group_uses_only_its_columns():
    fmt = IntAffine(bits=4, group_size=128)
    W = _w((4, 576), seed=6)  # groups of 128, 128, 128, 128, 64
    p = fmt.params(W)
    assert p["scale"].shape == (4, 5)
    W2 = W.clone()
    W2[:, 520] = 10.0  # inside the short last group
    p2 = fmt.params(W2)
    assert torch.equal(p2["scale"][:, :4], p["scale"][:, :4])
    assert bool((p2["scale"][:, 4] > p["scale"][:, 4]).all())
    lo, hi = _ref_params(W, fmt)
    ref = (hi.clamp(min=0) - lo.clamp(max=0)) / 15
    assert bool((p["scale"].double() >= ref).all())


def test_symmetric_uses_gptq_convention():
    fmt = IntAffine(bits=4, group_size=None, symmetric=True)
    W = _w((5, 300), seed=7)
    q = fmt.quantize(W)
    assert "zero_point" not in q.data
    absmax = W.double().abs().amax(1, keepdim=True)
    s = q["scale"].double()
    assert bool((s >= 2 * absmax / 15).all()) and bool((s <= 2 * absmax / 15 * (1 + 2 ** -10)).all())
    codes = unpack(q["qdata"], 4, 300).double()
    torch.testing.assert_close(q.dequantize().double(), (codes - 8) * s, rtol=0, atol=1e-7)


def test_float_zero_point_is_stored_as_float():
    fmt = IntAffine(bits=4, group_size=64, float_zero_point=True)
    W = _w((4, 256), seed=8) + 0.3  # all-positive groups: the float zero point is negative, not clamped
    q = fmt.quantize(W)
    assert q["zero_point"].dtype == torch.float16
    assert bool((q["zero_point"] < 0).all())
    lo, hi = _ref_params(W, fmt)
    torch.testing.assert_close(q.dequantize().double().amin(1), lo.amin(1), rtol=0, atol=float(q["scale"].max()) * 0.51)


def test_given_params_representable_weights_survive():
    fmt = IntAffine(bits=3, group_size=50)
    g = torch.Generator().manual_seed(9)
    codes = torch.randint(0, 8, (6, 130), generator=g)
    scale = (torch.rand(6, 3, generator=g) * 0.1 + 0.01).half()
    zero = torch.randint(0, 8, (6, 3), generator=g).to(torch.uint8)
    grp = _groups(fmt, 130)
    W = ((codes - zero.float()[:, grp]) * scale.float()[:, grp])
    q = fmt.quantize(W, scale=scale, zero_point=zero)
    assert torch.equal(unpack(q["qdata"], 3, 130).long(), codes)
    assert torch.equal(q.dequantize(), W)


def test_narrow_weight_with_one_group_of_params():
    # GPTQ rounds column by column with the params of the column's group.
    fmt = IntAffine(bits=4, group_size=128)
    W = _w((8, 576), seed=10)
    p = fmt.params(W)
    full = fmt.fake_quantize(W, **p)
    for j in (0, 5, 130, 575):
        k = j // 128
        col = fmt.fake_quantize(W[:, j:j + 1], scale=p["scale"][:, k:k + 1], zero_point=p["zero_point"][:, k:k + 1])
        assert torch.equal(col, full[:, j:j + 1])
    q = fmt.quantize(W[:, :5], scale=p["scale"][:, :1], zero_point=p["zero_point"][:, :1])
    assert q.shape == (8, 5) and torch.equal(q.dequantize(), full[:, :5])


def test_g_idx_act_order_groups():
    fmt = IntAffine(bits=4, group_size=32)
    W = _w((6, 96), seed=11)
    g = torch.Generator().manual_seed(11)
    perm = torch.randperm(96, generator=g)
    g_idx = (torch.arange(96) // 32)[torch.argsort(perm)].to(torch.int32)  # groups of a permuted column order
    scale = (torch.rand(6, 3, generator=g) * 0.02 + 0.005).half()
    zero = torch.full((6, 3), 8, dtype=torch.uint8)
    q = fmt.quantize(W, scale=scale, zero_point=zero, g_idx=g_idx)
    assert q.format.act_order and q.format.tensor_names() == ("qdata", "scale", "zero_point", "g_idx")
    assert torch.equal(q["g_idx"], g_idx)
    s, z = scale.double()[:, g_idx.long()], zero.double()[:, g_idx.long()]
    ref = ((W.double() / s + z).round().clamp(0, 15) - z) * s
    torch.testing.assert_close(q.dequantize().double(), ref, rtol=0, atol=1e-6)
    # the format with act_order round-trips through its spec and the op's tensor order
    assert Format.from_dict(q.format.to_dict()) == q.format


@pytest.mark.parametrize("fmt,shape", [(IntAffine(4, 128), (576, 1536)), (IntAffine(3, 64), (1536, 576)),
                                       (IntAffine(4, 128, float_zero_point=True), (576, 576)),
                                       (IntAffine(8, None, symmetric=True), (576, 1536))], ids=str)
def test_bits_per_weight_formula_on_default_model_shapes(fmt, shape):
    out, n = shape
    ng = math.ceil(n / fmt.group_size) if fmt.group_size else 1
    zbits = 0 if fmt.symmetric else (16 if fmt.float_zero_point else 8)
    expected = (out * math.ceil(n * fmt.bits / 8) * 8 + out * ng * (16 + zbits)) / (out * n)
    q = fmt.quantize(_w(shape))
    assert q.bits_per_weight == pytest.approx(expected, abs=1e-12)
    assert q.bits_per_weight == pytest.approx(fmt.bits_per_weight_formula(shape), abs=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 1}, "2..8"), ({"bits": 9}, "2..8"), ({"bits": 4.0}, "2..8"),
    ({"group_size": 0}, "group_size"), ({"group_size": -128}, "group_size"),
    ({"symmetric": True, "float_zero_point": True}, "symmetric"),
    ({"scale_dtype": torch.int8}, "scale_dtype"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IntAffine(**kwargs)


def test_bad_params():
    fmt = IntAffine(bits=4, group_size=128)
    W = _w((4, 300))
    p = fmt.params(W)
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        fmt.quantize(W, scale=p["scale"][:, :2], zero_point=p["zero_point"][:, :2])
    with pytest.raises(ValueError, match="both"):
        fmt.quantize(W, scale=p["scale"])
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        fmt.quantize(W, scale=p["scale"], zero_point=p["zero_point"].float() + 16)
    with pytest.raises(ValueError, match="positive"):
        fmt.quantize(W, scale=p["scale"] * 0, zero_point=p["zero_point"])
    with pytest.raises(ValueError, match="unknown"):
        fmt.quantize(W, absmax=p["scale"])
    with pytest.raises(ValueError, match="g_idx"):
        fmt.quantize(W, scale=p["scale"], zero_point=p["zero_point"], g_idx=torch.zeros(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="zero_point"):
        IntAffine(4, 128, symmetric=True).quantize(W, scale=p["scale"], zero_point=p["zero_point"])


def test_config_from_dict_rejects_unknown_field():
    d = IntAffine(bits=4).to_dict()
    d["zeros"] = 1
    with pytest.raises(ConfigError, match="zeros"):
        Format.from_dict(d)
