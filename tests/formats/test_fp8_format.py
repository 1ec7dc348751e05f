"""FP8 (E4M3/E5M2) weights: torch's casts with float32 absmax scales."""

import pytest
import torch

from lowbit.formats.fp8 import FP8


@pytest.mark.parametrize("dtype,tdtype,maxv", [("e4m3", torch.float8_e4m3fn, 448.0), ("e5m2", torch.float8_e5m2, 57344.0)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_matches_cast_with_absmax_scale(dtype, tdtype, maxv, per_channel):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 576, generator=g) * 0.03
    fmt = FP8(dtype, per_channel)
    q = fmt.quantize(W)
    absmax = W.abs().amax(1, keepdim=True) if per_channel else W.abs().max().reshape(1, 1)
    scale = absmax / maxv
    assert q["qdata"].dtype == tdtype and q["scale"].dtype == torch.float32
    torch.testing.assert_close(q["scale"], scale, rtol=0, atol=0)
    ref = (W / scale).to(tdtype).float() * scale
    assert torch.equal(q.dequantize(), ref)
    # the largest weight lands on the largest finite value
    assert float(q["qdata"].float().abs().max()) == maxv


def test_fp8_representable_values_exact_and_clamped():
    fmt = FP8("e4m3")
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[torch.isfinite(vals)].reshape(1, -1)
    scale = torch.tensor([[0.5]])
    assert torch.equal(fmt.quantize(vals * 0.5, scale=scale).dequantize(), vals * 0.5)
    big = torch.tensor([[1e6, -1e6]])
    assert fmt.quantize(big, scale=torch.ones(1, 1))["qdata"].float().tolist() == [[448.0, -448.0]]


def test_fp8_bad_input():
    with pytest.raises(ValueError, match="e4m3"):
        FP8("e3m4")
    with pytest.raises(ValueError, match=r"\(4, 1\)"):
        FP8("e4m3").quantize(torch.randn(4, 8), scale=torch.ones(1, 1))
    with pytest.raises(ValueError, match="positive"):
        FP8("e4m3").quantize(torch.randn(4, 8), scale=torch.zeros(4, 1))
