"""CPU fast paths (ATen packed int4/int8 matmuls) against the reference op."""


import pytest
import torch

from lowbit.formats.affine import IntAffine
from lowbit.formats.int8_rowwise import Int8Rowwise
from lowbit.ops import cpu
from lowbit.ops import reference as ref
from lowbit.ops.repack import repack_quantized
from tests.ops.fresh_process import expect_ok

# bf16 compute: ‖y − ref‖/‖ref‖ ≈ 2e-3 on random data; fp32 compute: ≈ 1e-6.
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-4}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("fmt", [IntAffine(bits=4, group_size=128), IntAffine(bits=4, group_size=32, symmetric=True),
                                 IntAffine(bits=4, group_size=64, float_zero_point=True),
                                 IntAffine(bits=4, group_size=None)], ids=lambda f: f.spec())
@pytest.mark.parametrize("K", [576, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_path_matches_reference(fmt, K, dtype):
    torch.manual_seed(K)
    q = fmt.quantize(torch.randn(40, K))
    w = cpu.pack_int4(repack_quantized(q), dtype)
    for M in (1, 5):
        x = torch.randn(M, K, dtype=dtype)
        y = cpu.linear(x, w)
        y_ref = ref.qlinear(x.float(), [q[n] for n in q.format.tensor_names()], q.format.spec(), list(q.shape), None)
        assert y.dtype == dtype and rel(y, y_ref) < TOL[dtype]


def test_int4_path_act_order():
    torch.manual_seed(0)
    K = 512
    fmt = IntAffine(bits=4, group_size=128)
    W = torch.randn(32, K)
    q = fmt.quantize(W, g_idx=(torch.randperm(K) // 128).to(torch.int32), **fmt.params(W))
    w = cpu.pack_int4(repack_quantized(q), torch.float32)
    x = torch.randn(3, K)
    assert rel(cpu.linear(x, w), x @ q.dequantize().float().t()) < TOL[torch.float32]


def test_int8_path_matches_reference():
    torch.manual_seed(1)
    q = Int8Rowwise().quantize(torch.randn(48, 320))
    for dtype in (torch.bfloat16, torch.float32):
        w = cpu.pack_int8(q["qdata"], q["scale"], dtype)
        x = torch.randn(4, 320, dtype=dtype)
        b = torch.randn(48)
        y_ref = x.float() @ q.dequantize().float().t() + b
        assert rel(cpu.linear(x, w, b), y_ref) < TOL[dtype]


def test_unsupported_formats_have_no_fast_path():
    assert cpu.pack(IntAffine(bits=3, group_size=128).quantize(torch.randn(8, 256))) is None
    with pytest.raises(ValueError, match="group_size=96"):
        cpu.pack_int4(repack_quantized(IntAffine(bits=4, group_size=96).quantize(torch.randn(8, 192))))


def test_enabled_qlinear_fast_path_matches_reference():
    # In a subprocess: the opt-in registration is process-wide and must not leak into other tests.
    code = (
        "import torch\n"
        "from lowbit.formats.affine import IntAffine\n"
        "from lowbit.nn.linear import QuantLinear\n"
        "from lowbit.ops import cpu, reference\n"
        "torch.manual_seed(0)\n"
        "q = IntAffine(bits=4, group_size=64).quantize(torch.randn(64, 192))\n"
        "m = QuantLinear(q)\n"
        "x = torch.randn(3, 192)\n"
        "y0 = m(x)\n"
        "cpu.enable_qlinear_fast_path(float32_compute='float32')\n"
        "y1 = m(x)\n"
        "d = float((y1 - y0).norm() / y0.norm())\n"
        "assert 0 < d < 1e-4, d\n"
        "print('ok', d)\n")
    expect_ok(code)


def test_quantlinear_calls_the_cpu_kernel_directly_only_without_gradients():
    # subprocess: the opt-in is process-wide. Without gradients QuantLinear skips the op dispatcher and calls the
    # op's CPU kernel itself: same output as the op; with an input that wants a gradient it goes through the op
    # (autograd recorded, the gradient equals the reference's).
    code = (
        "import torch\n"
        "from lowbit.formats.affine import IntAffine\n"
        "from lowbit.nn.linear import QuantLinear\n"
        "from lowbit.ops import cpu, reference\n"
        "torch.manual_seed(0)\n"
        "q = IntAffine(bits=4, group_size=128).quantize(torch.randn(64, 256))\n"
        "m = QuantLinear(q, torch.randn(64))\n"
        "x = torch.randn(2, 256)\n"
        "cpu.enable_qlinear_fast_path()\n"
        "import lowbit.nn.linear as L\n"
        "op_calls = []\n"
        "orig = L.qlinear\n"
        "L.qlinear = lambda *a: (op_calls.append(1), orig(*a))[1]\n"
        "with torch.no_grad():\n"
        "    y_direct = m(x)\n"
        "assert not op_calls, 'went through the op'\n"
        "data = [getattr(m, n) for n in m._names]\n"
        "y_op = torch.ops.lowbit.qlinear(x, data, m._spec, [64, 256], m.bias)\n"
        "assert torch.equal(y_direct, y_op)\n"
        "xg = x.clone().requires_grad_(True)\n"
        "y = m(xg)\n"
        "assert op_calls and y.grad_fn is not None\n"
        "y.sum().backward()\n"
        "g_ref = torch.ones(2, 64) @ q.dequantize().float()\n"
        "assert torch.allclose(xg.grad, g_ref, rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n")
    expect_ok(code)


# -- W8A8 (torch._int_mm): exact ---------------------------------------------------------------------------

from lowbit.formats.act_quant import ActQuant, int8_matmul, int8_matmul_reference  # noqa: E402

W8A8 = {"O1": Int8Rowwise(act=ActQuant("int8", "token")),
        "O2": Int8Rowwise(granularity="tensor", act=ActQuant("int8", "tensor")),
        "O3": Int8Rowwise(granularity="tensor", act=ActQuant("int8", "tensor", static=True)),
        "llm_int8": Int8Rowwise(act=ActQuant("int8", "token"), threshold=3.0)}


def test_cpu_int_mm_is_exact_on_extremes():
    torch.manual_seed(5)
    for M, K, N in ((1, 4096, 40), (3, 576, 64), (20, 320, 48)):
        a = torch.randint(-127, 128, (M, K), dtype=torch.int8)
        b = torch.randint(-127, 128, (N, K), dtype=torch.int8)
        a[0, :] = 127  # the largest |sum| the format allows: K·127²
        b[0, :] = 127
        b[1, :] = -127
        y = int8_matmul(a, b.t())  # torch._int_mm on the CPU for every shape
        assert y.dtype == torch.int32 and torch.equal(y, int8_matmul_reference(a, b.t()))
        assert int(y[0, 0]) == K * 127 * 127


@pytest.mark.parametrize("name", list(W8A8))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_path_is_bit_identical_to_reference(name, dtype):
    fmt = W8A8[name]
    torch.manual_seed(7)
    W = torch.randn(48, 320)
    params = {"act_scale": torch.tensor([0.05])} if fmt.act.static else {}
    q = fmt.quantize(W, **params)
    w = cpu.pack(q)
    assert isinstance(w, cpu.CpuW8A8Weight)
    data = [q[n] for n in q.format.tensor_names()]
    b = torch.randn(48)
    for M in (1, 5, 20):  # 20 > 16: the reference takes torch._int_mm too; below it an exact float64 matmul
        x = torch.randn(2, M, 320).to(dtype)
        x[0, 0, 3] = 8.0  # an outlier column for LLM.int8()
        y_ref = ref.qlinear(x, data, q.format.spec(), list(q.shape), b)
        y = cpu.linear(x, w, b)
        assert y.dtype == dtype and y.shape == y_ref.shape
        assert torch.equal(y, y_ref), float((y.float() - y_ref.float()).abs().max())
        assert float(y_ref.float().abs().max()) > 0  # never compared on zeros


def test_float32_compute_choices():
    assert cpu.compute_dtype(torch.float32) == torch.bfloat16
    int4 = IntAffine(bits=4, group_size=128)
    fast32 = cpu.cpu_lut4.isa() == "avx512" or cpu.cpu_vnni.available()
    assert cpu.compute_dtype(torch.float32, "auto", int4) == (torch.float32 if fast32 else torch.bfloat16)
    assert cpu.compute_dtype(torch.float32, "auto", Int8Rowwise()) == torch.bfloat16
    assert cpu.compute_dtype(torch.float32, "float32") == torch.float32
    assert cpu.compute_dtype(torch.float16, "float32") == torch.float16
    with pytest.raises(ValueError, match="valid choices"):
        cpu.compute_dtype(torch.float32, "fp8")


def test_enabled_fast_path_w8a8_and_float32_compute():
    # In a subprocess (the registration is process-wide). W8A8 through the op is exact; weight-only int4 with
    # float32 inputs: "auto" = float32 on the lut4 kernel where it builds (else bf16), "bfloat16" = bf16
    # rounding, "float32" ≈ 1e-7.
    code = (
        "import torch\n"
        "from lowbit.formats.act_quant import ActQuant\n"
        "from lowbit.formats.affine import IntAffine\n"
        "from lowbit.formats.int8_rowwise import Int8Rowwise\n"
        "from lowbit.nn.linear import QuantLinear\n"
        "from lowbit.ops import cpu\n"
        "torch.manual_seed(0)\n"
        "m8 = QuantLinear(Int8Rowwise(act=ActQuant('int8', 'token'), threshold=6.0).quantize(torch.randn(64, 256)))\n"
        "m4 = QuantLinear(IntAffine(bits=4, group_size=64).quantize(torch.randn(64, 256)))\n"
        "x = torch.randn(3, 256); x[1, 5] = 9.0\n"
        "r8, r4 = m8(x), m4(x)\n"
        "cpu.enable_qlinear_fast_path()\n"
        "assert torch.equal(m8(x), r8)\n"
        "cpu.disable_qlinear_fast_path()\n"
        "assert torch.equal(m4(x), r4)\n"
        "cpu.enable_qlinear_fast_path()\n"
        "d_auto = float((m4(x) - r4).norm() / r4.norm())\n"
        "cpu.enable_qlinear_fast_path(float32_compute='bfloat16')\n"
        "d_bf16 = float((m4(x) - r4).norm() / r4.norm())\n"
        "cpu.enable_qlinear_fast_path(float32_compute='float32')\n"
        "d_f32 = float((m4(x) - r4).norm() / r4.norm())\n"
        "assert 1e-4 < d_bf16 < 1e-2 and 0 < d_f32 < 1e-5, (d_bf16, d_f32)\n"
        "fast32 = cpu.cpu_lut4.isa() == 'avx512' or cpu.cpu_vnni.available()\n"
        "assert d_auto == d_f32 if fast32 else d_auto == d_bf16, (d_auto, d_f32, d_bf16)\n"
        "print('ok', d_auto, d_bf16, d_f32)\n")
    expect_ok(code)


def test_enabled_fast_path_many_rows_bf16_takes_aten():
    # More rows than the hand-written kernels take: bf16 inputs go to ATen's kernel (built on first use), float32
    # ones to the reference; both close to the reference.
    code = (
        "import torch\n"
        "from lowbit.formats.affine import IntAffine\n"
        "from lowbit.formats.int8_rowwise import Int8Rowwise\n"
        "from lowbit.nn.linear import QuantLinear\n"
        "from lowbit.ops import cpu\n"
        "torch.manual_seed(0)\n"
        "for q in (IntAffine(bits=4, group_size=128).quantize(torch.randn(64, 256)),\n"
        "          Int8Rowwise().quantize(torch.randn(64, 256))):\n"
        "    m = QuantLinear(q)\n"
        "    big = cpu.cpu_vnni.MAX_ROWS + 1\n"
        "    xs = [torch.randn(big, 256), torch.randn(2, 256).bfloat16(), torch.randn(big, 256).bfloat16()]\n"
        "    refs = [m(x) for x in xs]\n"
        "    cpu.enable_qlinear_fast_path()\n"
        "    for x, r in zip(xs, refs):\n"
        "        y = m(x)\n"
        "        d = float((y.double() - r.double()).norm() / r.double().norm())\n"
        "        assert y.dtype == x.dtype and d < (1e-6 if x.dtype == torch.float32 else 1e-2), (x.shape, d)\n"
        "    hit = cpu.cached_entry(m.qdata, torch.bfloat16)  # the bf16 entry, after the many-row call\n"
        "    assert isinstance(hit[2], (cpu.CpuInt4Weight, cpu.CpuInt8Weight)), hit[2]\n"
        "print('ok')\n")
    expect_ok(code)


def test_fast_path_keeps_one_packed_weight_per_input_dtype():
    # A layer called with float32 and bf16 inputs in turn packs its weight once per input dtype (it used to repack
    # on every switch); changing the stored weight in place repacks it and the outputs follow the new weight.
    code = (
        "import torch\n"
        "from lowbit.formats.codebook import Codebook\n"
        "from lowbit.nn.linear import QuantLinear\n"
        "from lowbit.ops import cpu\n"
        "torch.manual_seed(0)\n"
        "packs = []\n"
        "pack = cpu.pack\n"
        "cpu.pack = lambda *a, **k: packs.append(1) or pack(*a, **k)\n"
        "m = QuantLinear(Codebook('nf4', 64, True).quantize(torch.randn(32, 256)))\n"
        "xs = [torch.randn(1, 256), torch.randn(1, 256).bfloat16()]\n"
        "cpu.enable_qlinear_fast_path()\n"
        "with torch.no_grad():\n"
        "    for _ in range(3):\n"
        "        ys = [m(x) for x in xs]\n"
        "    assert len(packs) == 2, len(packs)\n"
        "    assert cpu.cached_entry(m.qdata, torch.float32) is not cpu.cached_entry(m.qdata, torch.bfloat16)\n"
        "    m.qdata.copy_(m.qdata.flip(0))  # rows reversed in place: a new version of the same tensor\n"
        "    ys2 = [m(x) for x in xs]\n"
        "    assert len(packs) == 4, len(packs)\n"
        "    cpu.disable_qlinear_fast_path()\n"
        "    refs = [m(x) for x in xs]\n"
        "for y, y2, r in zip(ys, ys2, refs):\n"
        "    assert not torch.equal(y, y2)\n"
        "    d = float((y2.double() - r.double()).norm() / r.double().norm())\n"
        "    assert d < (1e-2 if y2.dtype == torch.bfloat16 else 1e-6), d\n"
        "print('ok')\n")
    expect_ok(code)
