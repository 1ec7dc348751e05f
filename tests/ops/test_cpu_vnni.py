"""The VNNI CPU kernels (weight-only int8 and 4-bit affine, float inputs in int8 limbs) against float64 references."""

import os

import pytest
import torch

from lowbit.formats.int8_rowwise import Int8Rowwise
from lowbit.ops import cpu, cpu_vnni
from tests.ops.fresh_process import expect_ok

needs_kernel = pytest.mark.skipif(not cpu_vnni.available(), reason="int8 VNNI kernel not built here")


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@needs_kernel
def test_limbs_reconstruct_inputs_within_the_bound():
    torch.manual_seed(0)
    x = torch.randn(5, 300) * torch.logspace(-6, 2, 300)  # a wide dynamic range inside each row
    x[3] = 0.0  # an all-zero row
    u, s, xs = cpu_vnni.split_limbs(x, 320, group_size=64)
    assert u.shape == (5, cpu_vnni.LIMBS, 320) and s.shape == (5, cpu_vnni.LIMBS)
    q = u.to(torch.float64) - 128
    assert bool((q.abs() <= 127).all()) and bool((q[..., 300:] == 0).all())
    x_hat = (q[..., :300] * s.unsqueeze(-1)).sum(1)
    amax = x.abs().amax(1, keepdim=True).double()
    bound = amax / (127 * 254 * 254 * 2) * 1.01 + amax * 2e-7 / 127  # last limb's half step + float32 residuals
    assert bool(((x_hat - x.double()).abs() <= bound).all())
    assert bool((x_hat[3] == 0).all())
    xp = torch.nn.functional.pad(x, (0, 20)).double()
    assert torch.allclose(xs.double(), xp.reshape(5, 5, 64).sum(-1), rtol=1e-5, atol=1e-4)
    u2, s2, _ = cpu_vnni.split_limbs(x, 320, signed=True, n_limbs=2)  # int8 limbs, two of them
    assert u2.dtype == torch.int8 and u2.shape == (5, 2, 320)
    assert torch.equal(u2.to(torch.int16), (u[:, :2].to(torch.int16) - 128))
    assert torch.equal(s2, s[:, :2])
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_vnni.split_limbs(x, 310)


@needs_kernel
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("K", [576, 100, 1536])  # 100: padded to 64; 1536: 12 steps of 128
def test_w8_matches_float64_reference(granularity, K):
    torch.manual_seed(K)
    q = Int8Rowwise(granularity=granularity).quantize(torch.randn(40, K))
    w = cpu_vnni.pack_w8(q["qdata"], q["scale"])
    Wd = q.dequantize().double()
    b = torch.randn(40)
    for M in (1, 2, 3, 4, 5, 9):
        x = torch.randn(M, K)
        x[0, 0] = 40.0  # one large input: the limbs' error scales with max|x|
        y = cpu_vnni.w8_linear(x, w, b)
        assert y.dtype == torch.float32 and y.shape == (M, 40)
        assert rel(y, x.double() @ Wd.t() + b.double()) < 3e-6
    xb = torch.randn(2, 3, K).bfloat16()
    yb = cpu_vnni.w8_linear(xb, w)
    assert yb.dtype == torch.bfloat16 and yb.shape == (2, 3, 40)
    assert rel(yb, xb.double() @ Wd.t()) < 1e-2


@needs_kernel
def test_w8_through_cpu_pack():
    torch.manual_seed(1)
    q = Int8Rowwise().quantize(torch.randn(32, 128))
    w = cpu.pack(q, torch.bfloat16)
    assert isinstance(w, cpu_vnni.W8Weight)
    x = torch.randn(3, 128)
    assert rel(cpu.linear(x, w), x.double() @ q.dequantize().double().t()) < 3e-6
    assert cpu.linear(torch.randn(cpu_vnni.MAX_ROWS + 1, 128), w) is None  # the op takes the reference


def test_w8_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D int8"):
        cpu_vnni.pack_w8(torch.zeros(4, 8), torch.ones(4))
    with pytest.raises(ValueError, match="1 or 4 values"):
        cpu_vnni.pack_w8(torch.zeros(4, 8, dtype=torch.int8), torch.ones(3))


# -- 4-bit affine on VNNI ------------------------------------------------------------------------------------

from lowbit.formats.affine import IntAffine  # noqa: E402

INT4 = [IntAffine(bits=4, group_size=128), IntAffine(bits=4, group_size=128, symmetric=True),
        IntAffine(bits=4, group_size=256, float_zero_point=True), IntAffine(bits=4, group_size=None)]


@needs_kernel
@pytest.mark.parametrize("fmt,K", [(f, K) for f in INT4 for K in (576, 256)]  # 576 = 4.5 groups of 128
                         + [(IntAffine(bits=4, group_size=256), 200), (IntAffine(bits=4, group_size=None), 200)],
                         ids=lambda v: v.spec() if hasattr(v, "spec") else str(v))  # 200: one padded group per row
def test_int4_vnni_matches_float64_reference(fmt, K):
    torch.manual_seed(K)
    q = fmt.quantize(torch.randn(40, K))
    w = cpu_vnni.pack_int4(q)
    assert w.span == 128
    Wd = q.dequantize().double()
    b = torch.randn(40)
    for M in (1, 2, 3, 5):  # 1-2 rows per pass, and several passes
        x = torch.randn(M, K)
        y = cpu_vnni.int4_linear(x, w, b)
        assert y.dtype == torch.float32 and y.shape == (M, 40)
        assert rel(y, x.double() @ Wd.t() + b.double()) < 3e-6
    for M in (1, 2, 3, 4, 7):  # bf16 inputs: 2 limbs, 4 rows per pass
        xb = torch.randn(M, K).bfloat16()
        yb = cpu_vnni.int4_linear(xb, w)
        assert yb.dtype == torch.bfloat16 and yb.shape == (M, 40)
        assert rel(yb, xb.double() @ Wd.t()) < 1e-2
    assert cpu_vnni.int4_linear(torch.randn(2, 3, K).bfloat16(), w).shape == (2, 3, 40)


@needs_kernel
def test_int4_vnni_act_order_and_op_dispatch():
    torch.manual_seed(6)
    K = 512
    fmt = IntAffine(bits=4, group_size=128)
    W = torch.randn(48, K)
    q = fmt.quantize(W, g_idx=(torch.randperm(K) // 128).to(torch.int32), **fmt.params(W))
    w = cpu.pack(q, torch.bfloat16)  # group 128: the VNNI kernel, whatever the ATen compute dtype
    assert getattr(w, "span", None) == 128 and w.perm is not None
    x = torch.randn(3, K)
    assert rel(cpu.linear(x, w), x.double() @ q.dequantize().double().t()) < 3e-6
    with pytest.raises(ValueError, match="multiples of 128"):
        cpu_vnni.pack_int4(IntAffine(bits=4, group_size=64).quantize(torch.randn(8, 256)))


@needs_kernel
def test_two_limbs_error_bound():
    torch.manual_seed(2)
    x = torch.randn(4, 256) * 3
    u, s, _ = cpu_vnni.split_limbs(x, 256, n_limbs=2)
    x_hat = ((u.double() - 128) * s.unsqueeze(-1)).sum(1)
    amax = x.abs().amax(1, keepdim=True).double()
    assert bool(((x_hat - x.double()).abs() <= amax / (127 * 254 * 2) * 1.01).all())



@needs_kernel
def test_pack_w8_shares_the_stored_weight_when_it_can():
    b = torch.randint(-127, 128, (8, 128), dtype=torch.int8)
    assert cpu_vnni.pack_w8(b, torch.ones(8)).qdata.data_ptr() == b.data_ptr()  # K % 64 == 0: no copy
    w = cpu_vnni.pack_w8(b[:, :100], torch.ones(8))  # padded copy
    assert w.qdata.shape == (8, 128) and bool((w.qdata[:, 100:] == 0).all())
    assert torch.equal(w.offset, 128 * b[:, :100].sum(1).to(torch.int32))


@needs_kernel
def test_nonfinite_inputs_give_nan_rows():
    torch.manual_seed(3)
    q8 = Int8Rowwise().quantize(torch.randn(16, 128))
    q4 = IntAffine(bits=4, group_size=128).quantize(torch.randn(16, 128))
    x = torch.randn(3, 128)
    x[1, 7] = float("inf")
    x[2, 100] = float("nan")
    for y in (cpu_vnni.w8_linear(x, cpu_vnni.pack_w8(q8["qdata"], q8["scale"])),
              cpu_vnni.int4_linear(x, cpu_vnni.pack_int4(q4))):
        assert bool(torch.isfinite(y[0]).all()) and bool(torch.isnan(y[1:]).all())


def test_avx_vnni_variant_matches_float64_reference():
    # The 256-bit AVX-VNNI kernels (laptops without AVX-512), forced on this machine in a subprocess.
    code = (
        "import torch\n"
        "from lowbit.formats.affine import IntAffine\n"
        "from lowbit.formats.int8_rowwise import Int8Rowwise\n"
        "from lowbit.ops import cpu_vnni as V\n"
        "if V.isa() != 'avx2':\n"
        "    print('skip', V.isa()); raise SystemExit\n"
        "def rel(y, r):\n"
        "    return float((y.double() - r).norm() / r.norm())\n"
        "torch.manual_seed(0)\n"
        "for K in (576, 256, 100):\n"
        "    q = Int8Rowwise().quantize(torch.randn(24, K)); w = V.pack_w8(q['qdata'], q['scale'])\n"
        "    Wd = q.dequantize().double()\n"
        "    for M in (1, 3):\n"
        "        x = torch.randn(M, K)\n"
        "        assert rel(V.w8_linear(x, w), x.double() @ Wd.t()) < 3e-6\n"
        "for fmt in (IntAffine(bits=4, group_size=128), IntAffine(bits=4, group_size=256, float_zero_point=True),\n"
        "            IntAffine(bits=4, group_size=None)):\n"
        "    for K in (576, 256):\n"
        "        q = fmt.quantize(torch.randn(24, K)); w = V.pack_int4(q); Wd = q.dequantize().double()\n"
        "        for M in (1, 3):\n"
        "            x = torch.randn(M, K)\n"
        "            assert rel(V.int4_linear(x, w), x.double() @ Wd.t()) < 3e-6, (fmt, K, M)\n"
        "            xb = x.bfloat16()\n"
        "            assert rel(V.int4_linear(xb, w), xb.double() @ Wd.t()) < 1e-2\n"
        "x = torch.randn(2, 128); x[1, 3] = float('nan')\n"
        "y = V.int4_linear(x, V.pack_int4(IntAffine(bits=4, group_size=128).quantize(torch.randn(8, 128))))\n"
        "assert bool(torch.isfinite(y[0]).all()) and bool(torch.isnan(y[1]).all())\n"
        "print('ok')\n")
    env = dict(os.environ, LOWBIT_CPU_ISA="avx2")
    expect_ok(code, env)


@needs_kernel
def test_no_rows():
    q8 = Int8Rowwise().quantize(torch.randn(8, 256))
    q4 = IntAffine(bits=4, group_size=128).quantize(torch.randn(8, 256))
    x = torch.randn(0, 256)
    assert cpu_vnni.w8_linear(x, cpu_vnni.pack_w8(q8["qdata"], q8["scale"])).shape == (0, 8)
    assert cpu_vnni.int4_linear(x, cpu_vnni.pack_int4(q4)).shape == (0, 8)


@needs_kernel
def test_int4_vnni_rejects_inputs_of_the_wrong_width_before_the_act_order_gather():
    K = 256
    fmt = IntAffine(bits=4, group_size=128)
    W = torch.randn(16, K)
    q = fmt.quantize(W, g_idx=(torch.randperm(K) // 128).to(torch.int32), **fmt.params(W))
    w = cpu_vnni.pack_int4(q)
    assert w.perm is not None
    for bad in (128, 384):
        with pytest.raises(ValueError, match=f"x has {bad} features, the weight {K}"):
            cpu_vnni.int4_linear(torch.randn(2, bad), w)
