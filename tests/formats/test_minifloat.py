"""ExMy minifloat format: exact rounding (vs torch float8 casts and a float64 brute-force grid search),
code bijection, saturation, scales, the max-value search and the exponent-bits finding of arXiv 2208.09225."""

from __future__ import annotations

import pytest
import torch

from lowbit.config import ConfigError
from lowbit.formats.act_quant import ActQuant, fake_quantize_activation, int8_matmul, int8_matmul_reference
from lowbit.formats.base import Format, format_from_spec
from lowbit.formats.int8_rowwise import Int8Rowwise
from lowbit.formats.minifloat import Minifloat, MinifloatGrid, best_exponent_bits, round_to_grid, search_maxval

GRIDS = [MinifloatGrid(5, 2, "ieee"), MinifloatGrid(4, 3, "fn"), MinifloatGrid(3, 4), MinifloatGrid(2, 5),
         MinifloatGrid(2, 1), MinifloatGrid(4, 3, "none"), MinifloatGrid(3, 2), MinifloatGrid(1, 2)]


def _wide_sample(n: int, grid: MinifloatGrid, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(torch.randn(n, generator=g, dtype=torch.float64) * 6)
    return x.clamp(-grid.max_value, grid.max_value)


@pytest.mark.parametrize("name,dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_rounding_and_codes_equal_torch_float8(name: str, dtype: torch.dtype) -> None:
    grid = Minifloat.preset(name).grid
    x = _wide_sample(200_000, grid).to(torch.float32)
    # add every grid value and every midpoint (ties, incl. subnormal ones) explicitly
    v = grid.values()
    mids = (v[1:] + v[:-1]) / 2
    x = torch.cat([x, v.float(), -v.float(), mids.float(), -mids.float()])
    ref = x.to(dtype)
    assert torch.equal(round_to_grid(x, grid), ref.to(torch.float32))
    assert torch.equal(grid.encode(round_to_grid(x, grid)).to(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"E{g.exponent_bits}M{g.mantissa_bits}{g.special}")
def test_rounding_is_nearest_grid_value_ties_to_even(grid: MinifloatGrid) -> None:
    v = grid.values()
    allv = torch.cat([-v.flip(0), v])
    x = _wide_sample(20_000, grid, seed=1)
    q = round_to_grid(x, grid)
    d = (x.unsqueeze(1) - allv.unsqueeze(0)).abs()
    best = d.min(dim=1).values
    assert torch.equal((q - x).abs(), best)  # nearest (float64 brute force)
    # exact midpoints go to the neighbour with an even mantissa code
    mids = (v[1:] + v[:-1]) / 2
    qm = round_to_grid(mids, grid)
    codes = grid.encode(qm)
    assert bool(((codes & 1) == 0).all())


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"E{g.exponent_bits}M{g.mantissa_bits}{g.special}")
def test_encode_decode_bijection_on_all_finite_codes(grid: MinifloatGrid) -> None:
    v = grid.values().to(torch.float32)
    allv = torch.cat([v, -v[1:]])
    codes = grid.encode(allv)
    assert codes.unique().numel() == allv.numel()
    assert bool((codes >= 0).all()) and bool((codes < (1 << grid.total_bits)).all())
    assert torch.equal(grid.decode(codes), allv)


def test_saturates_instead_of_overflowing() -> None:
    grid = MinifloatGrid(4, 3, "fn")
    x = torch.tensor([1e6, -1e6, 449.0, 470.0, float("inf")])
    assert round_to_grid(x, grid).tolist() == [448.0, -448.0, 448.0, 448.0, 448.0]
    assert torch.isnan(round_to_grid(torch.tensor([float("nan")]), grid)).all()


def test_fp4_grid_and_max_values() -> None:
    assert MinifloatGrid(2, 1).values().tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert MinifloatGrid(4, 3, "fn").max_value == 448.0
    assert MinifloatGrid(5, 2, "ieee").max_value == 57344.0
    assert MinifloatGrid(4, 3, "none").max_value == 480.0


@pytest.mark.parametrize("fmt", Minifloat.examples(), ids=lambda f: f.spec())
def test_format_roundtrip_error_and_spec(fmt: Minifloat) -> None:
    g = torch.Generator().manual_seed(2)
    W = torch.randn(24, 200, generator=g)
    q = fmt.quantize(W)
    Wh = q.dequantize()
    assert Wh.shape == W.shape and Wh.dtype == W.dtype
    # representable values survive exactly: quantizing the dequantized weight with the same scales is a no-op
    q2 = fmt.quantize(Wh, scale=q["scale"])
    assert torch.equal(q2.dequantize(), Wh)
    assert torch.equal(fmt.codes(q2), fmt.codes(q))
    # error at most half the local step, times the scale
    from lowbit.formats.minifloat import _expand_rows

    S = _expand_rows(q["scale"], W.shape[1], fmt.granularity, fmt._gs(W.shape[1]))
    xs = (W / S).clamp(-fmt.grid.max_value, fmt.grid.max_value).double()
    _, ex = torch.frexp(xs)
    step = torch.exp2((ex - 1).clamp(min=1 - fmt.grid.b) - fmt.grid.mantissa_bits)
    assert bool(((Wh.double() / S - xs).abs() <= step / 2 + 1e-12).all())
    assert format_from_spec(fmt.spec()) == fmt
    assert Format.from_dict(fmt.to_dict()) == fmt


def test_packing_halves_fp4_storage_and_shorter_last_group() -> None:
    fmt = Minifloat.preset("fp4", granularity="group", group_size=128)
    W = torch.randn(8, 576)  # 576 = 4·128 + 64: a shorter last group
    q = fmt.quantize(W)
    assert q["qdata"].shape == (8, 288) and q["scale"].shape == (8, 5)
    assert q.bits_per_weight == pytest.approx(4 + 5 * 32 / 576)
    last = W[:, 512:]
    sl = last.abs().amax(dim=1) / 6.0
    assert torch.allclose(q["scale"][:, 4], sl)
    odd = Minifloat.preset("fp4", granularity="channel").quantize(torch.randn(3, 7))
    assert odd.dequantize().shape == (3, 7)


def test_pow2_scales() -> None:
    W = torch.randn(16, 256) * torch.rand(16, 1) * 3
    m1 = Minifloat.preset("fp4", granularity="group", group_size=64, pow2_scale="ceil").params(W)["scale"]
    assert torch.equal(m1, torch.exp2(torch.log2(m1).round()))
    m2 = Minifloat.preset("fp4", granularity="group", group_size=64, pow2_scale="row").params(W)["scale"]
    ratio = m2 / m2.amax(dim=1, keepdim=True)
    assert torch.equal(ratio, torch.exp2(torch.log2(ratio).round()))
    # constrained scales never clip: every group absmax is within the grid
    rtn = Minifloat.preset("fp4", granularity="group", group_size=64).params(W)["scale"]
    assert bool((m1 >= rtn).all()) and bool((m2 >= rtn * (1 - 1e-6)).all())


def test_search_maxval_minimises_mse_over_its_candidates() -> None:
    grid = MinifloatGrid(4, 3, "fn")
    x = torch.distributions.StudentT(2.0).sample((4000,))
    mv = search_maxval(x, grid, n_grid=50)
    err = lambda m: float((round_to_grid(x / (m / grid.max_value), grid) * (m / grid.max_value) - x).pow(2).sum())  # noqa: E731
    amax = float(x.abs().max())
    cands = [amax * r for r in torch.linspace(0.2, 1.0, 50).tolist()]
    assert err(float(mv)) <= min(err(c) for c in cands) + 1e-9
    assert err(float(mv)) <= err(amax)
    rows = torch.randn(5, 300) * torch.tensor([[1.0], [10], [0.1], [3], [100]])
    per_row = search_maxval(rows, grid, dim=1)
    for i in range(5):
        assert float(per_row[i]) == pytest.approx(float(search_maxval(rows[i], grid)))


def test_heavier_tails_pick_more_exponent_bits() -> None:
    torch.manual_seed(0)
    n = 4000
    pick = lambda x: best_exponent_bits(x, n_grid=25)[0]  # noqa: E731
    picks = [pick(torch.rand(n) * 2 - 1), pick(torch.randn(n))]
    picks += [pick(torch.distributions.StudentT(df).sample((n,))) for df in (4.0, 2.0, 1.0)]
    assert picks == sorted(picks), picks  # monotone in tail weight
    assert picks[1] <= 2 and picks[-1] >= 3, picks


def test_bad_options_name_choices() -> None:
    with pytest.raises(ValueError, match="valid choices"):
        Minifloat(granularity="row")
    with pytest.raises(ValueError, match="valid choices"):
        Minifloat(exponent_bits=9)
    with pytest.raises(ValueError, match="valid choices"):
        Minifloat.preset("e9m9")
    with pytest.raises(ValueError, match="valid choices"):
        Minifloat(pow2_scale="floor")
    with pytest.raises(ValueError, match="NaN"):
        Minifloat().quantize(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2-D"):
        Minifloat().quantize(torch.ones(3))
    with pytest.raises(ValueError, match="valid choices"):
        ActQuant(dtype="int4")
    with pytest.raises(ConfigError):
        Format.from_dict({"kind": "minifloat", "exponent_bitz": 3})


def test_activation_fake_quant_int8_and_fp8() -> None:
    x = torch.randn(6, 40) * torch.arange(1, 7).unsqueeze(1)
    xi = fake_quantize_activation(x, ActQuant("int8", "token"))
    s = x.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(xi, torch.round(x / s) * s)
    xt = fake_quantize_activation(x, ActQuant("int8", "tensor"))
    st = x.abs().max() / 127
    assert torch.allclose(xt, torch.round(x / st) * st)
    xf = fake_quantize_activation(x, ActQuant("e4m3", "token"))
    s8 = x.abs().amax(1, keepdim=True) / 448
    assert torch.equal(xf, ((x / s8).to(torch.float8_e4m3fn).float() * s8))


def test_int8_matmul_equals_exact_reference() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-127, 128, (40, 1536), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (1536, 72), generator=g, dtype=torch.int8)
    ref = int8_matmul_reference(a, b)
    exact = (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32)
    assert torch.equal(ref, exact)
    assert torch.equal(int8_matmul(a, b), exact)
    assert torch.equal(int8_matmul(a, b.t().contiguous().t()), exact)  # transposed weight view
    with pytest.raises(TypeError):
        int8_matmul(a.float(), b)
    # small and odd shapes (one token, k and n not multiples of 8), extreme codes included
    for m, k, n in ((1, 576, 1536), (3, 7, 5), (16, 13, 9)):
        a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        b = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
        a[0, 0], b[0, 0] = -128, -128
        assert torch.equal(int8_matmul(a, b), (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32)), (m, k, n)


@pytest.mark.parametrize("fmt", [Minifloat.preset("e4m3", act=ActQuant("e4m3", "token")),
                                 Minifloat.preset("fp4", granularity="group", group_size=16),
                                 Int8Rowwise(act=ActQuant("int8", "token"), threshold=6.0),
                                 Int8Rowwise(granularity="tensor", act=ActQuant("int8", "tensor", static=True))],
                         ids=lambda f: f.kind)
def test_qlinear_opcheck_with_activation_quantizing_formats(fmt: Format) -> None:
    from lowbit.ops import qlinear

    g = torch.Generator().manual_seed(5)
    params = {"act_scale": torch.tensor(0.1)} if "act_scale" in fmt.tensor_names() else {}
    q = fmt.quantize(torch.randn(32, 48, generator=g), **params)
    x = (torch.randn(16, 48, generator=g) * 4).requires_grad_(True)
    data = [q[n] for n in fmt.tensor_names()]
    torch.library.opcheck(qlinear, (x, data, fmt.spec(), [32, 48], torch.randn(32, generator=g)))
