"""The bf16-input lut4 kernel (AVX512-BF16, ``span=64``) against float64 references and the reference op.

Standard: for bf16 inputs the reference op dequantizes to ``bf16(code · absmax)`` (float32 product, rounded to
nearest-even) and multiplies in bf16. The kernel uses those same bf16 weights (checked exactly with one-hot
inputs), forms exact products and accumulates in float32: against the float64 product of the same bf16 inputs
and weights its float32 output is within float32 accumulation error (measured 3e-8 .. 1.2e-7 on random data;
bound 1e-6), and its bf16 output differs from the reference op's by bf16 output rounding (measured ≤ 1.5e-3;
bound 1e-2).
"""

import os

import pytest
import torch

from lowbit.formats.codebook import Codebook
from lowbit.ops import cpu, cpu_lut4
from lowbit.ops import reference as ref
from tests.ops.fresh_process import expect_ok, run_fresh

needs_bf16 = pytest.mark.skipif(not cpu_lut4.bf16_available(),
                                reason="bf16 lut4 kernel not built here (AVX512-BF16 + C compiler)")
TOL = 1e-6  # float32 output against float64 with the same bf16 weights and inputs


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _data(q):
    return [q[n] for n in q.format.tensor_names()]


# group = gcd(K, block_size): 64, 128, 256 and 192; K = 576 (9 * 64: a last half-chunk of 64), 1536, 640, 192
CASES = [(Codebook("nf4", 64, True), 576), (Codebook("nf4", 64, False), 1536), (Codebook("fp4", 128, False), 640),
         (Codebook("nf4", 256, True), 1536), (Codebook("nf4", 192, False), 576), (Codebook("fp4", 64, True), 192)]


@needs_bf16
@pytest.mark.parametrize("fmt,K", CASES, ids=lambda c: c.spec() if hasattr(c, "spec") else str(c))
def test_bf16_kernel_matches_float64_and_the_reference_op(fmt, K):
    torch.manual_seed(K + fmt.block_size)
    N = 37  # odd, not a multiple of the four rows per step
    q = fmt.quantize(torch.randn(N, K))
    w = cpu_lut4.pack_codebook(q, span=64)
    assert w.span == 64 and w.group_size % 64 == 0
    Wb = q.dequantize().to(torch.bfloat16).double()  # the reference's weights for bf16 inputs
    b = torch.randn(N)
    for M in (1, 3, 17):  # one row; a partial pass; four passes of four and one of one
        x = torch.randn(M, K).bfloat16()
        y = cpu_lut4.lut4_linear(x, w, b, out_dtype=torch.float32)
        assert y.dtype == torch.float32 and y.shape == (M, N)
        assert rel(y, x.double() @ Wb.t() + b.double()) < TOL
        yb = cpu_lut4.lut4_linear(x, w, b)
        assert yb.dtype == torch.bfloat16
        y_ref = ref.qlinear(x, _data(q), fmt.spec(), [N, K], b)
        assert rel(yb, y_ref) < 1e-2
    x3 = torch.randn(2, 3, K).bfloat16()  # leading dimensions kept
    assert cpu_lut4.lut4_linear(x3, w).shape == (2, 3, N)


@needs_bf16
def test_bf16_kernel_weights_are_exactly_the_references():
    # One-hot inputs read single weights out: y[k, n] = W_bf16[n, k] bit for bit (one exact product, zeros elsewhere).
    torch.manual_seed(7)
    for fmt, K in ((Codebook("nf4", 64, True), 576), (Codebook("fp4", 128, False), 256)):
        q = fmt.quantize(torch.randn(9, K) * 3)
        y = cpu_lut4.lut4_linear(torch.eye(K).bfloat16(), cpu_lut4.pack_codebook(q, span=64), out_dtype=torch.float32)
        assert torch.equal(y.t(), q.dequantize().to(torch.bfloat16).float())


@needs_bf16
def test_bf16_kernel_custom_codebook():
    # Any 16-entry table: random values, random per-group scales, K = 320 (two and a half chunks of 128).
    torch.manual_seed(11)
    N, K, g = 21, 320, 64
    lut = torch.randn(16).sort().values
    codes = torch.randint(0, 16, (N, K))
    scale = torch.rand(N, K // g) + 0.1
    w = cpu_lut4.pack_lut4(codes, scale, lut, g, span=64)
    W = (lut[codes] * scale.repeat_interleave(g, 1)).to(torch.bfloat16).double()  # float32 product, then bf16
    for M in (1, 5):
        x = torch.randn(M, K).bfloat16()
        assert rel(cpu_lut4.lut4_linear(x, w, out_dtype=torch.float32), x.double() @ W.t()) < TOL


@needs_bf16
def test_bf16_kernel_nan_and_inf_propagate_as_the_reference():
    # inf · w = ±inf, inf · 0 (the NF4 zero code) = NaN, +inf + −inf = NaN: the same outputs are NaN / ±inf as in the
    # float64 product and in the reference op; the others stay finite.
    torch.manual_seed(5)
    fmt, N, K = Codebook("nf4", 64, True), 40, 576
    q = fmt.quantize(torch.randn(N, K))
    w = cpu_lut4.pack_codebook(q, span=64)
    x = torch.randn(4, K)
    x[0, 10] = float("inf")
    x[1, 300] = float("-inf")
    x[2, 575] = float("nan")  # in the last, half chunk
    x = x.bfloat16()
    y = cpu_lut4.lut4_linear(x, w, out_dtype=torch.float32)
    r = x.double() @ q.dequantize().to(torch.bfloat16).double().t()
    y_ref = ref.qlinear(x, _data(q), fmt.spec(), [N, K], None).float()
    for expect in (r, y_ref):
        assert torch.equal(torch.isnan(y), torch.isnan(expect))
        assert torch.equal(torch.isinf(y), torch.isinf(expect))
        assert torch.equal(torch.sign(y[torch.isinf(y)]), torch.sign(expect[torch.isinf(expect)].float()))
    assert bool(torch.isnan(y[2]).all()) and bool(torch.isfinite(y[3]).all())
    assert bool(torch.isnan(y[0]).any()) and bool(torch.isinf(y[0]).any())  # zero codes and nonzero ones in column 10


@needs_bf16
def test_dispatch_bf16_inputs_take_the_bf16_kernel_and_float32_ones_do_not():
    q = Codebook("nf4", 64, True).quantize(torch.randn(32, 576))
    assert cpu.pack(q, torch.bfloat16).span == 64
    assert cpu.pack(q, torch.float32).span == 32  # float32 inputs keep float32 math
    assert cpu.pack(q, torch.float16).span == 32  # fp16 -> bf16 would round the inputs: not taken
    assert cpu.compute_dtype(torch.float32, "auto", q.format) == torch.float32
    assert cpu.compute_dtype(torch.bfloat16, "auto", q.format) == torch.bfloat16
    # groups of 32 (gcd(K, block_size) = 32): the float32 kernel takes bf16 inputs
    assert cpu.pack(Codebook("nf4", 32, True).quantize(torch.randn(4, 128)), torch.bfloat16).span == 32
    w = cpu.pack(q, torch.bfloat16)
    assert cpu.linear(torch.randn(cpu_lut4.MAX_ROWS, 576).bfloat16(), w) is not None
    assert cpu.linear(torch.randn(cpu_lut4.MAX_ROWS + 1, 576).bfloat16(), w) is None  # the caller takes the reference


def test_quantlinear_reaches_the_bf16_kernel():
    # The user's path, in a fresh process (the fast path is a process-wide switch): an NF4 QuantLinear with bf16
    # inputs packs the span-64 layout and returns the kernel's output; float32 inputs get the float32 kernel.
    code = (
        "import torch\n"
        "from lowbit.formats.codebook import Codebook\n"
        "from lowbit.nn.linear import QuantLinear\n"
        "from lowbit.ops import cpu, cpu_lut4\n"
        "if not cpu_lut4.bf16_available():\n"
        "    print('skip: no bf16 kernel here'); raise SystemExit\n"
        "torch.manual_seed(0)\n"
        "q = Codebook('nf4', 64, True).quantize(torch.randn(48, 576))\n"
        "m = QuantLinear(q, torch.randn(48))\n"
        "x = torch.randn(2, 576).bfloat16()\n"
        "y_ref = m(x)\n"
        "cpu.enable_qlinear_fast_path()\n"
        "with torch.no_grad():\n"
        "    y = m(x)\n"
        "    w = getattr(m.qdata, '_lowbit_cpu_packed')[1]\n"
        "    assert isinstance(w, cpu_lut4.Lut4Weight) and w.span == 64, w\n"
        "    assert torch.equal(y, cpu_lut4.lut4_linear(x, w, m.bias)), 'not the kernel output'\n"
        "    d = float((y.double() - y_ref.double()).norm() / y_ref.double().norm())\n"
        "    assert y.dtype == torch.bfloat16 and d < 1e-2, d\n"
        "    m(x.float())\n"
        "    assert getattr(m.qdata, '_lowbit_cpu_packed')[1].span == 32\n"
        "print('ok', d)\n")
    expect_ok(code)


def test_without_avx512_bf16_or_a_compiler_bf16_inputs_keep_the_other_paths(tmp_path):
    # LOWBIT_CPU_ISA=avx2 (a laptop's kernels): no bf16 kernel, NF4 bf16 inputs go to the float32 AVX2 kernel.
    # No compiler: neither kernel; the op keeps the reference. Both say so in the log.
    code = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from lowbit.formats.codebook import Codebook\n"
        "from lowbit.nn.linear import QuantLinear\n"
        "from lowbit.ops import cpu, cpu_lut4\n"
        "assert not cpu_lut4.bf16_available()\n"
        "q = Codebook('nf4', 64, True).quantize(torch.randn(32, 128))\n"
        "w = cpu.pack(q, torch.bfloat16)\n"
        "if cpu_lut4.available():\n"
        "    assert w.span == 32 and cpu_lut4.isa() == 'avx2'\n"
        "else:\n"
        "    assert w is None\n"
        "m = QuantLinear(q); x = torch.randn(2, 128).bfloat16(); y0 = m(x)\n"
        "cpu.enable_qlinear_fast_path()\n"
        "with torch.no_grad():\n"
        "    y = m(x)\n"
        "assert float((y.double() - y0.double()).norm() / y0.double().norm()) < 1e-2\n"
        "print('ok')\n")
    for env, logged in ((dict(os.environ, LOWBIT_CPU_ISA="avx2"), "bf16 lut4 kernel (avx512 only) is not used"),
                        (dict(os.environ, CC=str(tmp_path / "no-such-cc"), LOWBIT_CACHE_DIR=str(tmp_path / "cache")),
                         "CPU kernel lut4_bf16_avx512 not available")):
        out = run_fresh(code, env)
        assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]
        assert out.stderr.count(logged) == 1, out.stderr[-2000:]  # logged, once
