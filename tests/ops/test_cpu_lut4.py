"""The lut4 CPU kernel (NF4/FP4 and 4-bit IntAffine, float32 math) against float64 references."""

import os

import pytest
import torch

from lowbit.formats.affine import IntAffine
from lowbit.formats.codebook import Codebook
from lowbit.ops import cpu, cpu_lut4
from tests.ops.fresh_process import expect_ok, run_fresh

needs_kernel = pytest.mark.skipif(not cpu_lut4.available(), reason="lut4 kernel not built here (AVX-512 + C compiler)")
TOL = 2e-6  # float32 accumulation over K ≤ 576 on random data: measured ≈ 1e-7 (codebooks) to 5e-7 (affine)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


FORMATS = [Codebook("nf4", 64, True), Codebook("nf4", 64, False), Codebook("fp4", 128, False),
           Codebook("nf4", 32, True, 16), IntAffine(bits=4, group_size=128), IntAffine(bits=4, group_size=32, symmetric=True),
           IntAffine(bits=4, group_size=64, float_zero_point=True), IntAffine(bits=4, group_size=None)]


def _pack(q):
    return cpu_lut4.pack_codebook(q) if q.format.kind == "codebook" else cpu_lut4.pack_affine4(q)


@needs_kernel
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.spec())
@pytest.mark.parametrize("K", [576, 256, 96])  # 576 = 4.5 blocks of 128 and 96 = 1.5 of 64: rows start mid-block
def test_lut4_matches_float64_reference(fmt, K):
    torch.manual_seed(K)
    q = fmt.quantize(torch.randn(40, K))
    w = _pack(q)
    Wd = q.dequantize().double()
    b = torch.randn(40)
    for M in (1, 2, 3, 4, 5, 9):  # 1-4 rows per pass, and several passes
        x = torch.randn(M, K)
        y = cpu_lut4.lut4_linear(x, w, b)
        assert y.dtype == torch.float32 and y.shape == (M, 40)
        assert rel(y, x.double() @ Wd.t() + b.double()) < TOL
    xb = torch.randn(2, 3, K).bfloat16()  # bf16 inputs are widened exactly; the output is rounded to bf16
    yb = cpu_lut4.lut4_linear(xb, w)
    assert yb.dtype == torch.bfloat16 and yb.shape == (2, 3, 40)
    assert rel(yb, xb.double() @ Wd.t()) < 1e-2


@needs_kernel
def test_lut4_act_order_and_padding():
    torch.manual_seed(3)
    K = 200  # not a multiple of 32: padded to whole groups of 32
    fmt = IntAffine(bits=4, group_size=32)
    W = torch.randn(24, K)
    q = fmt.quantize(W, g_idx=(torch.randperm(K) // 32).to(torch.int32), **fmt.params(W))
    w = cpu_lut4.pack_affine4(q)
    assert w.perm is not None and w.padded_in == 224
    x = torch.randn(3, K)
    assert rel(cpu_lut4.lut4_linear(x, w), x.double() @ q.dequantize().double().t()) < TOL


@needs_kernel
def test_lut4_through_cpu_pack_and_row_limit():
    torch.manual_seed(4)
    q = Codebook("nf4", 64, True).quantize(torch.randn(32, 128))
    w = cpu.pack(q, torch.bfloat16)
    assert isinstance(w, cpu_lut4.Lut4Weight)
    assert cpu.linear(torch.randn(cpu_lut4.MAX_ROWS, 128), w) is not None
    assert cpu.linear(torch.randn(cpu_lut4.MAX_ROWS + 1, 128), w) is None  # the caller takes the reference
    assert isinstance(cpu.pack(IntAffine(bits=4, group_size=64).quantize(torch.randn(32, 128)), torch.float32),
                      cpu_lut4.Lut4Weight)


def test_lut4_rejects_what_it_cannot_take():
    with pytest.raises(ValueError, match="multiples of 32"):
        cpu_lut4.pack_lut4(torch.zeros(4, 96, dtype=torch.uint8), torch.ones(4, 2), torch.arange(16.0), 48)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        cpu_lut4.pack_lut4(torch.full((4, 64), 16, dtype=torch.uint8), torch.ones(4, 2), torch.arange(16.0), 32)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        cpu_lut4.pack_codebook(Codebook("nf4", 64, False).quantize(torch.randn(4, 80)))
    with pytest.raises(ValueError, match="4-bit codebook"):
        cpu_lut4.pack_codebook(Codebook("nf3", 64, False).quantize(torch.randn(4, 64)))
    # not packable -> no fast path (the op keeps the reference)
    assert cpu.pack(Codebook("nf4", 64, False).quantize(torch.randn(4, 80))) is None


def test_no_compiler_falls_back(tmp_path):
    # A fresh cache dir and a compiler that does not exist: the kernel is unavailable, NF4 has no fast path and
    # the enabled op still gives the reference result.
    code = (
        "import torch\n"
        "from lowbit.formats.codebook import Codebook\n"
        "from lowbit.nn.linear import QuantLinear\n"
        "from lowbit.ops import cpu, cpu_lut4\n"
        "assert not cpu_lut4.available()\n"
        "q = Codebook('nf4', 64, True).quantize(torch.randn(32, 128))\n"
        "assert cpu.pack(q) is None\n"
        "m = QuantLinear(q); x = torch.randn(2, 128); y0 = m(x)\n"
        "cpu.enable_qlinear_fast_path()\n"
        "assert torch.equal(m(x), y0)\n"
        "print('ok')\n")
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), LOWBIT_CACHE_DIR=str(tmp_path / "cache"))
    expect_ok(code, env)


def test_avx2_variant_matches_float64_reference():
    # The AVX2 kernel (laptops without AVX-512), forced on this machine in a subprocess.
    code = (
        "import torch\n"
        "from lowbit.formats.affine import IntAffine\n"
        "from lowbit.formats.codebook import Codebook\n"
        "from lowbit.ops import cpu_lut4 as L\n"
        "if L.isa() != 'avx2':\n"
        "    print('skip', L.isa()); raise SystemExit\n"
        "torch.manual_seed(0)\n"
        "for fmt in (Codebook('nf4', 64, True), Codebook('fp4', 128, False), IntAffine(bits=4, group_size=32),\n"
        "            IntAffine(bits=4, group_size=64, float_zero_point=True)):\n"
        "    for K in (576, 96):\n"
        "        q = fmt.quantize(torch.randn(24, K))\n"
        "        w = L.pack_codebook(q) if fmt.kind == 'codebook' else L.pack_affine4(q)\n"
        "        for M in (1, 3):\n"
        "            x = torch.randn(M, K)\n"
        "            r = x.double() @ q.dequantize().double().t()\n"
        "            d = float((L.lut4_linear(x, w).double() - r).norm() / r.norm())\n"
        "            assert d < 2e-6, (fmt, K, M, d)\n"
        "print('ok')\n")
    env = dict(os.environ, LOWBIT_CPU_ISA="avx2")
    expect_ok(code, env)


def test_unknown_isa_is_an_error():
    code = "from lowbit.ops import cpu_lut4\ncpu_lut4.available()\n"
    env = dict(os.environ, LOWBIT_CPU_ISA="sse9")
    out = run_fresh(code, env)
    assert out.returncode != 0 and "valid choices" in out.stderr and "avx2" in out.stderr


@needs_kernel
def test_lut4_linear_rejects_inputs_of_the_wrong_width():
    # the kernel reads padded_in values per row: a narrower or wider x must be an error, never a read past it
    q = Codebook("nf4", 64, True).quantize(torch.randn(8, 192))
    spans = (32, 64) if cpu_lut4.span64_available() else (32,)
    for span in spans:
        w = cpu_lut4.pack_codebook(q, span=span)
        for K in (128, 200):
            with pytest.raises(ValueError, match=f"x has {K} features, the weight 192"):
                cpu_lut4.lut4_linear(torch.randn(2, K).bfloat16(), w)
