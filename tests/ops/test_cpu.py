"""CPU fast paths (ATen packed int4/int8 matmuls) against the reference op."""

import subprocess
import sys

import pytest
import torch

from lowbit.formats.affine import IntAffine
from lowbit.formats.int8_rowwise import Int8Rowwise
from lowbit.ops import cpu
from lowbit.ops import reference as ref

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
    w = cpu.pack(q, dtype)
    assert isinstance(w, cpu.CpuInt4Weight)
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
    w = cpu.pack(q, torch.float32)
    x = torch.randn(3, K)
    assert rel(cpu.linear(x, w), x @ q.dequantize().float().t()) < TOL[torch.float32]


def test_int8_path_matches_reference():
    torch.manual_seed(1)
    q = Int8Rowwise().quantize(torch.randn(48, 320))
    for dtype in (torch.bfloat16, torch.float32):
        w = cpu.pack(q, dtype)
        assert isinstance(w, cpu.CpuInt8Weight)
        x = torch.randn(4, 320, dtype=dtype)
        b = torch.randn(48)
        y_ref = x.float() @ q.dequantize().float().t() + b
        assert rel(cpu.linear(x, w, b), y_ref) < TOL[dtype]


def test_unsupported_formats_have_no_fast_path():
    assert cpu.pack(IntAffine(bits=3, group_size=128).quantize(torch.randn(8, 256))) is None
    with pytest.raises(ValueError, match="group_size=96"):
        from lowbit.ops.repack import repack_quantized
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
        "cpu.enable_qlinear_fast_path()\n"
        "y1 = m(x)\n"
        "d = float((y1 - y0).norm() / y0.norm())\n"
        "assert 0 < d < 1e-4, d\n"
        "print('ok', d)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")
