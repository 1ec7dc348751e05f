"""Properties every registered format must have (tier 1 of DESIGN.md), run over ``format_registry()``.

Each format contributes its ``examples()``; a format whose layout rejects a test shape (``validate_shape``)
is checked on the shapes it accepts.
"""

import pytest
import torch

import lowbit.formats  # noqa: F401  (registers the built-in formats)
from lowbit.formats.base import Format, format_from_spec, format_registry
from lowbit.nn.linear import QuantLinear

SHAPES = [(16, 576), (7, 200), (4, 1536), (3, 256)]


def _cases():
    for kind, cls in sorted(format_registry().items()):
        for i, fmt in enumerate(cls.examples()):
            yield pytest.param(fmt, id=f"{kind}-{i}")


CASES = list(_cases())


def _weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 0.05


def _accepted_shapes(fmt):
    ok = []
    for s in SHAPES:
        try:
            fmt.validate_shape(s)
        except ValueError:
            continue
        ok.append(s)
    return ok


@pytest.mark.parametrize("kind", sorted(format_registry()))
def test_every_registered_format_has_examples(kind):
    examples = format_registry()[kind].examples()
    assert examples, f"format {kind!r} returns no examples(); the registry-wide property tests cannot check it"
    assert all(isinstance(f, Format) and f.kind == kind for f in examples)


@pytest.mark.parametrize("fmt", CASES)
def test_config_roundtrip(fmt):
    assert Format.from_dict(fmt.to_dict()) == fmt
    assert format_from_spec(fmt.spec()) == fmt


@pytest.mark.parametrize("fmt", CASES)
def test_dequantize_keeps_shape_and_dtype(fmt):
    shapes = _accepted_shapes(fmt)
    assert shapes, f"{fmt} accepts none of {SHAPES}"
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            W = _weight(shape).to(dtype)
            q = fmt.quantize(W)
            assert set(q.data) == set(fmt.tensor_names()) or set(q.data) == set(q.format.tensor_names())
            Wd = q.dequantize()
            assert Wd.shape == W.shape and Wd.dtype == dtype
            assert bool(torch.isfinite(Wd).all())


@pytest.mark.parametrize("fmt", CASES)
def test_representable_values_survive_exactly(fmt):
    # With fixed parameters, the dequantized values are on the grid: quantizing them again gives them back.
    for shape in _accepted_shapes(fmt):
        W = _weight(shape, seed=1)
        p = fmt.params(W)
        W1 = fmt.quantize(W, **p).dequantize()
        W2 = fmt.quantize(W1, **p).dequantize()
        if not p and not torch.equal(W2, W1):
            # The format exposes no parameters: quantize() re-derives them (e.g. llama.cpp's scale searches),
            # so re-quantizing its own output need not be idempotent. Recorded, not hidden.
            pytest.xfail(f"{fmt} re-derives its parameters inside quantize(); {int((W2 != W1).sum())} values moved")
        assert torch.equal(W2, W1), f"{fmt} at {shape}: {int((W2 != W1).sum())} values moved"


@pytest.mark.parametrize("fmt", CASES)
def test_fake_quantize_equals_quantize_dequantize(fmt):
    for shape in _accepted_shapes(fmt):
        W = _weight(shape, seed=2)
        p = fmt.params(W)
        assert torch.equal(fmt.fake_quantize(W, **p), fmt.quantize(W, **p).dequantize())


@pytest.mark.parametrize("fmt", CASES)
def test_bits_per_weight_counts_every_stored_byte(fmt):
    for shape in _accepted_shapes(fmt):
        q = fmt.quantize(_weight(shape))
        stored = sum(t.numel() * t.element_size() for t in q.data.values())
        assert q.bits_per_weight == pytest.approx(stored * 8 / (shape[0] * shape[1]), rel=0, abs=1e-12)
        formula = getattr(q.format, "bits_per_weight_formula", None)
        if formula is not None:
            assert q.bits_per_weight == pytest.approx(formula(shape), rel=0, abs=1e-12)


@pytest.mark.parametrize("fmt", CASES)
def test_quant_linear_matches_dequantized_matmul(fmt):
    if getattr(fmt, "act", None) is not None:
        pytest.skip(f"{fmt} also quantizes activations (W8A8-style); its own tests check the op")
    shape = _accepted_shapes(fmt)[0]
    W = _weight(shape, seed=3)
    q = fmt.quantize(W)
    x = torch.randn(2, 3, shape[1])
    y = QuantLinear(q)(x)
    torch.testing.assert_close(y, x @ q.dequantize().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", CASES)
def test_bad_weights_are_rejected(fmt):
    shape = _accepted_shapes(fmt)[0]
    W = _weight(shape)
    W[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fmt.quantize(W)
    with pytest.raises(ValueError, match="2-D"):
        fmt.quantize(torch.randn(2, *shape))
    with pytest.raises(TypeError):
        fmt.quantize(torch.ones(shape, dtype=torch.int32))
