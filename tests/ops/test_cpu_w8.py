"""The int8 VNNI CPU kernel (weight-only int8, float inputs in three int8 limbs) against float64 references."""

import pytest
import torch

from lowbit.formats.int8_rowwise import Int8Rowwise
from lowbit.ops import cpu, cpu_w8

needs_kernel = pytest.mark.skipif(not cpu_w8.available(), reason="int8 VNNI kernel not built here")


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@needs_kernel
def test_limbs_reconstruct_inputs_within_the_bound():
    torch.manual_seed(0)
    x = torch.randn(5, 300) * torch.logspace(-6, 2, 300)  # a wide dynamic range inside each row
    x[3] = 0.0  # an all-zero row
    u, s = cpu_w8.split_limbs(x, 320)
    assert u.shape == (5, cpu_w8.LIMBS, 320) and s.shape == (5, cpu_w8.LIMBS)
    q = u.to(torch.float64) - 128
    assert bool((q.abs() <= 127).all()) and bool((q[..., 300:] == 0).all())
    x_hat = (q[..., :300] * s.unsqueeze(-1)).sum(1)
    amax = x.abs().amax(1, keepdim=True).double()
    bound = amax / (127 * 254 * 254 * 2) * 1.01 + amax * 2e-7 / 127  # last limb's half step + float32 residuals
    assert bool(((x_hat - x.double()).abs() <= bound).all())
    assert bool((x_hat[3] == 0).all())


@needs_kernel
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("K", [576, 100, 1536])  # 100: padded to 64; 1536: 12 steps of 128
def test_w8_matches_float64_reference(granularity, K):
    torch.manual_seed(K)
    q = Int8Rowwise(granularity=granularity).quantize(torch.randn(40, K))
    w = cpu_w8.pack_w8(q["qdata"], q["scale"])
    Wd = q.dequantize().double()
    b = torch.randn(40)
    for M in (1, 2, 3, 4, 5, 9):
        x = torch.randn(M, K)
        x[0, 0] = 40.0  # one large input: the limbs' error scales with max|x|
        y = cpu_w8.w8_linear(x, w, b)
        assert y.dtype == torch.float32 and y.shape == (M, 40)
        assert rel(y, x.double() @ Wd.t() + b.double()) < 3e-6
    xb = torch.randn(2, 3, K).bfloat16()
    yb = cpu_w8.w8_linear(xb, w)
    assert yb.dtype == torch.bfloat16 and yb.shape == (2, 3, 40)
    assert rel(yb, xb.double() @ Wd.t()) < 1e-2


@needs_kernel
def test_w8_through_cpu_pack():
    torch.manual_seed(1)
    q = Int8Rowwise().quantize(torch.randn(32, 128))
    w = cpu.pack(q, torch.bfloat16)
    assert isinstance(w, cpu_w8.W8Weight)
    x = torch.randn(3, 128)
    assert rel(cpu.linear(x, w), x.double() @ q.dequantize().double().t()) < 3e-6
    assert cpu.linear(torch.randn(cpu_w8.MAX_ROWS + 1, 128), w) is None  # the op takes the reference


def test_w8_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D int8"):
        cpu_w8.pack_w8(torch.zeros(4, 8), torch.ones(4))
    with pytest.raises(ValueError, match="1 or 4 values"):
        cpu_w8.pack_w8(torch.zeros(4, 8, dtype=torch.int8), torch.ones(3))
