"""The span-64 lut4 kernel (AVX-512; NF4/FP4/custom codebooks and 4-bit affine) against float64 references and the
reference op.

Standards. float32 (and fp16) inputs: float32 weights ``lut · scale`` and float32 math, so against the float64
product with the dequantized weight the output is within float32 accumulation error (measured 3e-8 .. 1.4e-7 on
random data; bound 2e-6, as for the span-32 kernel). bf16 inputs on codebook weights: the reference op dequantizes
to ``bf16(code · absmax)`` (float32 product rounded to nearest-even) and multiplies in bf16; the kernel uses those
same bf16 weights (checked exactly with one-hot inputs, ties and subnormal products included), forms exact
products and accumulates in float32: against the float64 product of the same bf16 inputs and weights its float32
output is within 1e-6 (measured 3e-8 .. 8e-8), and its bf16 output differs from the reference op's by bf16 output
rounding (bound 1e-2).
"""

import os

import pytest
import torch

from lowbit.formats.affine import IntAffine
from lowbit.formats.codebook import Codebook
from lowbit.ops import cpu, cpu_lut4
from lowbit.ops import reference as ref
from tests.ops.fresh_process import expect_ok, run_fresh

needs_span64 = pytest.mark.skipif(not cpu_lut4.span64_available(),
                                  reason="span-64 lut4 kernel not built here (AVX-512 + C compiler)")
TOL32 = 2e-6  # float32 inputs against float64 with the float32 weights
TOL = 1e-6  # bf16 inputs: float32 output against float64 with the same bf16 weights and inputs


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _data(q):
    return [q[n] for n in q.format.tensor_names()]


# group = gcd(K, block_size): 64, 128, 256 and 192; K = 576 (4.5 blocks of 128: a last 64), 1536, 640, 192
CASES = [(Codebook("nf4", 64, True), 576), (Codebook("nf4", 64, False), 1536), (Codebook("fp4", 128, False), 640),
         (Codebook("nf4", 256, True), 1536), (Codebook("nf4", 192, False), 576), (Codebook("fp4", 64, True), 192)]
IDS = [f"{f.name}-b{f.block_size}-dq{int(f.double_quant)}-K{K}" for f, K in CASES]


@needs_span64
@pytest.mark.parametrize("fmt,K", CASES, ids=IDS)
def test_span64_float32_inputs_match_float64(fmt, K):
    torch.manual_seed(K + fmt.block_size)
    N = 37  # odd
    q = fmt.quantize(torch.randn(N, K))
    w = cpu_lut4.pack_codebook(q, span=64)
    assert w.span == 64 and w.group_size % 64 == 0
    Wd = q.dequantize().double()
    b = torch.randn(N)
    for M in (1, 3, 17):  # one row; a partial pass of four; four passes of four and one of one
        x = torch.randn(M, K)
        y = cpu_lut4.lut4_linear(x, w, b)
        assert y.dtype == torch.float32 and y.shape == (M, N)
        assert rel(y, x.double() @ Wd.t() + b.double()) < TOL32
    xh = torch.randn(3, K).half()  # fp16 inputs: widened exactly, float32 weights, output rounded to fp16
    yh = cpu_lut4.lut4_linear(xh, w, out_dtype=torch.float32)
    assert rel(yh, xh.double() @ Wd.t()) < TOL32
    assert cpu_lut4.lut4_linear(xh, w).dtype == torch.float16


@needs_span64
@pytest.mark.parametrize("fmt,K", CASES, ids=IDS)
def test_span64_bf16_inputs_match_float64_and_the_reference_op(fmt, K):
    torch.manual_seed(K + fmt.block_size + 1)
    N = 37
    q = fmt.quantize(torch.randn(N, K))
    w = cpu_lut4.pack_codebook(q, span=64)
    Wb = q.dequantize().to(torch.bfloat16).double()  # the reference's weights for bf16 inputs
    b = torch.randn(N)
    for M in (1, 3, 17):
        x = torch.randn(M, K).bfloat16()
        y = cpu_lut4.lut4_linear(x, w, b, out_dtype=torch.float32)
        assert y.dtype == torch.float32 and y.shape == (M, N)
        assert rel(y, x.double() @ Wb.t() + b.double()) < TOL
        yb = cpu_lut4.lut4_linear(x, w, b)
        assert yb.dtype == torch.bfloat16
        assert rel(yb, ref.qlinear(x, _data(q), fmt.spec(), [N, K], b)) < 1e-2
    x3 = torch.randn(2, 3, K).bfloat16()  # leading dimensions kept
    assert cpu_lut4.lut4_linear(x3, w).shape == (2, 3, N)


def test_span64_codes_without_their_spare_bytes_are_refused():
    # The kernel's offset loads read 3 bytes past the last row; a copy of the codes (clone, a loaded file) has no
    # spare bytes after it, so the call must refuse it rather than read past the copy. The packed weight works.
    import dataclasses

    torch.manual_seed(3)
    q = Codebook("nf4", 64, True).quantize(torch.randn(5, 128))
    w = cpu_lut4.pack_codebook(q, span=64)
    copied = dataclasses.replace(w, codes=w.codes.clone())
    with pytest.raises(ValueError, match="spare bytes"):
        cpu_lut4.lut4_linear(torch.randn(2, 128), copied)
    if cpu_lut4.span64_available():
        y = cpu_lut4.lut4_linear(torch.randn(2, 128), w)
        assert y.shape == (2, 5) and bool(y.isfinite().all())


@needs_span64
def test_span64_weights_are_exactly_the_references():
    # One-hot inputs read single weights out: y[k, n] = W[n, k] bit for bit (one exact product, zeros elsewhere):
    # float32 inputs the float32 weights, bf16 inputs the reference's bf16 weights.
    torch.manual_seed(7)
    for fmt, K in ((Codebook("nf4", 64, True), 576), (Codebook("fp4", 128, False), 256)):
        q = fmt.quantize(torch.randn(9, K) * 3)
        w = cpu_lut4.pack_codebook(q, span=64)
        y = cpu_lut4.lut4_linear(torch.eye(K).bfloat16(), w, out_dtype=torch.float32)
        assert torch.equal(y.t(), q.dequantize().to(torch.bfloat16).float())
        assert torch.equal(cpu_lut4.lut4_linear(torch.eye(K), w).t(), q.dequantize().float())


@needs_span64
def test_span64_bf16_rounding_ties_and_subnormals_as_torch():
    # Scales chosen so that lut · scale lands exactly halfway between two bf16 values (ties to even, both ways; also
    # near the top of the range) and below the float32 normal range (subnormal products). (Products that round to
    # inf cannot be read out with one-hot inputs: 0 · inf is NaN.)
    lut = torch.tensor([1.0, -1.0, 0.5, 3.0, 0.0, 1e-3, -2.0, 7.0, 0.25, -0.75, 1.5, 2.5, -5.0, 6.0, 0.125, -8.0])
    scales = torch.tensor([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 3e-39, 1e-41, 2.0 ** 120 * (1 + 2.0 ** -8), 0.37])
    N, g = 3, 64
    K = g * len(scales)
    codes = torch.arange(N * K).reshape(N, K) % 16
    scale = scales.expand(N, -1).contiguous()
    w = cpu_lut4.pack_lut4(codes, scale, lut, g, span=64)
    W32 = lut[codes] * scale.repeat_interleave(g, 1)  # the float32 products, as the reference forms them
    assert bool((W32.abs() < 1.18e-38).logical_and(W32 != 0).any())  # subnormal products present
    y = cpu_lut4.lut4_linear(torch.eye(K).bfloat16(), w, out_dtype=torch.float32).t()
    expect = W32.to(torch.bfloat16).float()
    assert not torch.equal(expect, W32)  # the rounding matters here
    assert torch.equal(y, expect)


@needs_span64
def test_span64_custom_codebook():
    # Any 16-entry table: random values, random per-group scales, K = 320 (two and a half blocks of 128).
    torch.manual_seed(11)
    N, K, g = 21, 320, 64
    lut = torch.randn(16).sort().values
    codes = torch.randint(0, 16, (N, K))
    scale = torch.rand(N, K // g) + 0.1
    w = cpu_lut4.pack_lut4(codes, scale, lut, g, span=64)
    W32 = lut[codes] * scale.repeat_interleave(g, 1)
    for M in (1, 5):
        x = torch.randn(M, K)
        assert rel(cpu_lut4.lut4_linear(x, w), x.double() @ W32.double().t()) < TOL32
        xb = x.bfloat16()
        y = cpu_lut4.lut4_linear(xb, w, out_dtype=torch.float32)
        assert rel(y, xb.double() @ W32.to(torch.bfloat16).double().t()) < TOL


@needs_span64
@pytest.mark.parametrize("fmt", [IntAffine(bits=4, group_size=64), IntAffine(bits=4, group_size=64, symmetric=True),
                                 IntAffine(bits=4, group_size=192, float_zero_point=True), IntAffine(bits=4, group_size=None)],
                         ids=lambda f: f.spec())
def test_span64_affine_float32(fmt):
    # 4-bit affine groups the VNNI kernel does not take (64, 192) and one group per row (K = 576 -> 576)
    torch.manual_seed(13)
    N, K = 37, 576
    q = fmt.quantize(torch.randn(N, K))
    w = cpu_lut4.pack_affine4(q, span=64)
    b = torch.randn(N)
    for M in (1, 3, 17):
        x = torch.randn(M, K)
        assert rel(cpu_lut4.lut4_linear(x, w, b), x.double() @ q.dequantize().double().t() + b.double()) < TOL32


@needs_span64
def test_span64_affine_padded_act_order_any_input_dtype():
    # K = 600 padded to 640 (groups of 64), act-order: bf16 and fp16 inputs keep float32 weights (affine) and are
    # widened exactly; the codes keep 64 spare bytes for the kernel's offset loads past the last row.
    torch.manual_seed(17)
    N, K, fmt = 23, 600, IntAffine(bits=4, group_size=64)
    W = torch.randn(N, K)
    q = fmt.quantize(W, g_idx=(torch.randperm(K) // 64).to(torch.int32), **fmt.params(W))
    w = cpu_lut4.pack_affine4(q, span=64)
    assert w.perm is not None and w.padded_in == 640 and w.round_up is None
    assert w.codes.untyped_storage().nbytes() >= w.codes.numel() + 64
    Wd = q.dequantize().double()
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(3, K).to(dt)
        assert rel(cpu_lut4.lut4_linear(x, w, out_dtype=torch.float32), x.double() @ Wd.t()) < TOL32


@needs_span64
def test_span64_bf16_output_written_by_the_kernel_equals_torchs_cast():
    # bf16 in, bf16 out: the kernel adds the bias and rounds to bf16 itself. That must be bit for bit torch's cast of
    # the float32 result + bias (the kernel's own float32 output path), ties to even, ±inf, NaN and overflow included.
    torch.manual_seed(11)
    fmt, N, K = Codebook("nf4", 64, True), 45, 576
    q = fmt.quantize(torch.randn(N, K))
    w = cpu_lut4.pack_codebook(q, span=64)
    x = torch.randn(6, K).bfloat16()
    x[1, 7] = float("inf")
    x[2, 99] = float("nan")
    for b in (torch.randn(N), torch.randn(N).bfloat16(), None):
        y32 = cpu_lut4.lut4_linear(x, w, out_dtype=torch.float32)
        expect = (y32 if b is None else y32 + b.float()).to(torch.bfloat16)
        got = cpu_lut4.lut4_linear(x, w, b)
        assert got.dtype == torch.bfloat16
        assert torch.equal(torch.isnan(got), torch.isnan(expect))
        fin = ~torch.isnan(expect)
        assert torch.equal(got[fin].view(torch.int16), expect[fin].view(torch.int16))
        assert bool(torch.isinf(got[1]).any()) and bool(torch.isnan(got[2]).all())
    # float32 sums exactly halfway between two bf16 values round to the even one, as torch does; finite float32 sums
    # past bf16's largest finite value become +-inf
    big = 2.0 ** 127 * (2 - 2.0 ** -9)
    vals = torch.tensor([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -(1.0 + 2.0 ** -8), 3.0 * 2.0 ** -8 + 2.0 ** -16, big, -big])
    w1 = cpu_lut4.pack_codebook(Codebook("nf4", 64, False).quantize(torch.eye(6, 64)), span=64)
    xs = torch.zeros(1, 64).bfloat16()
    xs[0, 0] = 1.0  # the output is the bias alone (+ 1 · w[:, 0]); pick the bias so that the float32 sum is a tie
    w0 = cpu_lut4.lut4_linear(xs, w1, out_dtype=torch.float32)[0]
    bias = vals - w0
    got = cpu_lut4.lut4_linear(xs, w1, bias)
    expect = (w0 + bias).to(torch.bfloat16)
    assert torch.equal(w0 + bias, vals)  # the float32 sums are the ties / the large values themselves
    assert torch.equal(got[0].view(torch.int16), expect.view(torch.int16))
    assert got[0, 4] == float("inf") and got[0, 5] == float("-inf")


@needs_span64
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_span64_nan_and_inf_propagate_as_the_reference(dtype):
    # inf · w = ±inf, inf · 0 (the NF4 zero code) = NaN, +inf + −inf = NaN: the same outputs are NaN / ±inf as in the
    # float64 product and in the reference op; the others stay finite.
    torch.manual_seed(5)
    fmt, N, K = Codebook("nf4", 64, True), 40, 576
    q = fmt.quantize(torch.randn(N, K))
    w = cpu_lut4.pack_codebook(q, span=64)
    x = torch.randn(4, K)
    x[0, 10] = float("inf")
    x[1, 300] = float("-inf")
    x[2, 575] = float("nan")  # in the last 64
    x = x.to(dtype)
    y = cpu_lut4.lut4_linear(x, w, out_dtype=torch.float32)
    r = x.double() @ q.dequantize().to(dtype).double().t()
    y_ref = ref.qlinear(x, _data(q), fmt.spec(), [N, K], None).float()
    for expect in (r, y_ref):
        assert torch.equal(torch.isnan(y), torch.isnan(expect))
        assert torch.equal(torch.isinf(y), torch.isinf(expect))
        assert torch.equal(torch.sign(y[torch.isinf(y)]), torch.sign(expect[torch.isinf(expect)].float()))
    assert bool(torch.isnan(y[2]).all()) and bool(torch.isfinite(y[3]).all())
    assert bool(torch.isnan(y[0]).any()) and bool(torch.isinf(y[0]).any())  # zero codes and nonzero ones in column 10


@needs_span64
def test_dispatch_takes_the_span64_kernel_where_the_groups_allow():
    q = Codebook("nf4", 64, True).quantize(torch.randn(32, 576))
    for dt in (torch.bfloat16, torch.float32, torch.float16):
        assert cpu.pack(q, dt).span == 64
    assert cpu.compute_dtype(torch.float32, "auto", q.format) == torch.float32
    assert cpu.compute_dtype(torch.bfloat16, "auto", q.format) == torch.bfloat16
    # groups of 32 (gcd(K, block_size) = 32): the span-32 kernel
    assert cpu.pack(Codebook("nf4", 32, True).quantize(torch.randn(4, 128)), torch.bfloat16).span == 32
    # 4-bit affine, float32 inputs: groups of 64 -> span 64; of 32 -> span 32; of 128 -> the VNNI kernel where it builds
    assert cpu.pack(IntAffine(bits=4, group_size=64).quantize(torch.randn(8, 576)), torch.float32).span == 64
    assert cpu.pack(IntAffine(bits=4, group_size=32).quantize(torch.randn(8, 576)), torch.float32).span == 32
    if cpu.cpu_vnni.available():
        assert cpu.pack(IntAffine(bits=4, group_size=128).quantize(torch.randn(8, 512)), torch.float32).span == 128
    w = cpu.pack(q, torch.bfloat16)
    x = torch.randn(3, 576).bfloat16()
    assert torch.equal(cpu.linear(x, w), cpu_lut4.lut4_linear(x, w))
    assert cpu.linear(torch.randn(cpu_lut4.MAX_ROWS, 576).bfloat16(), w) is not None
    assert cpu.linear(torch.randn(cpu_lut4.MAX_ROWS + 1, 576).bfloat16(), w) is None  # the caller takes the reference


def test_quantlinear_reaches_the_span64_kernel():
    # The user's path, in a fresh process (the fast path is a process-wide switch): an NF4 QuantLinear packs the
    # span-64 layout and returns the kernel's output, for bf16 and float32 inputs.
    code = (
        "import torch\n"
        "from lowbit.formats.codebook import Codebook\n"
        "from lowbit.nn.linear import QuantLinear\n"
        "from lowbit.ops import cpu, cpu_lut4\n"
        "if not cpu_lut4.span64_available():\n"
        "    print('skip: no span-64 kernel here'); raise SystemExit\n"
        "torch.manual_seed(0)\n"
        "q = Codebook('nf4', 64, True).quantize(torch.randn(48, 576))\n"
        "m = QuantLinear(q, torch.randn(48))\n"
        "for x in (torch.randn(2, 576).bfloat16(), torch.randn(1, 576)):\n"
        "    y_ref = m(x)\n"
        "    cpu.enable_qlinear_fast_path()\n"
        "    with torch.no_grad():\n"
        "        y = m(x)\n"
        "        w = cpu.cached_entry(m.qdata, x.dtype)[1]\n"
        "        assert isinstance(w, cpu_lut4.Lut4Weight) and w.span == 64, w\n"
        "        assert torch.equal(y, cpu_lut4.lut4_linear(x, w, m.bias)), 'not the kernel output'\n"
        "    cpu.disable_qlinear_fast_path()\n"
        "    d = float((y.double() - y_ref.double()).norm() / y_ref.double().norm())\n"
        "    assert y.dtype == x.dtype and d < (1e-2 if x.dtype == torch.bfloat16 else 2e-6), d\n"
        "print('ok')\n")
    expect_ok(code)


def test_without_avx512_or_a_compiler_the_other_paths_take_over(tmp_path):
    # LOWBIT_CPU_ISA=avx2 (a laptop's kernels): no span-64 kernel, NF4 goes to the span-32 AVX2 kernel.
    # No compiler: neither kernel; the op keeps the reference. Both say so in the log.
    code = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from lowbit.formats.codebook import Codebook\n"
        "from lowbit.nn.linear import QuantLinear\n"
        "from lowbit.ops import cpu, cpu_lut4\n"
        "assert not cpu_lut4.span64_available()\n"
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
    for env, logged in ((dict(os.environ, LOWBIT_CPU_ISA="avx2"), "span-64 lut4 kernel (avx512 only) is not used"),
                        (dict(os.environ, CC=str(tmp_path / "no-such-cc"), LOWBIT_CACHE_DIR=str(tmp_path / "cache")),
                         "CPU kernel lut4_span64_avx512 not available")):
        out = run_fresh(code, env)
        assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]
        assert out.stderr.count(logged) == 1, out.stderr[-2000:]  # logged, once
