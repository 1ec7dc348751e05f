"""``torch.library.opcheck`` on every lowbit op with real formats, on the CPU (reference implementations)."""

import pytest
import torch

import lowbit.ops.schema as S
from lowbit.formats.act_quant import ActQuant
from lowbit.formats.affine import IntAffine
from lowbit.formats.codebook import Codebook, RowCodebook
from lowbit.formats.int8_rowwise import Int8Rowwise
from lowbit.ops import repack as R

FORMATS = [IntAffine(bits=4, group_size=32), IntAffine(bits=3, group_size=32, symmetric=True),
           IntAffine(bits=4, group_size=32, act_order=True), Codebook("nf4", 64, True), RowCodebook(3),
           Int8Rowwise(), Int8Rowwise(act=ActQuant("int8", "token"), threshold=6.0)]


def _quantized(fmt, N=24, K=64):
    torch.manual_seed(0)
    return fmt.quantize(torch.randn(N, K))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.spec())
def test_opcheck_qlinear(fmt):
    q = _quantized(fmt)
    data = [q[n] for n in fmt.tensor_names()]
    x = torch.randn(3, 64) * 4  # some |x| >= 6 for the LLM.int8() case
    torch.library.opcheck(S.qlinear, (x, data, fmt.spec(), list(q.shape), torch.randn(24)))
    torch.library.opcheck(S.qlinear, (x.requires_grad_(), data, fmt.spec(), list(q.shape), None))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.spec())
def test_opcheck_dequantize(fmt):
    q = _quantized(fmt)
    data = [q[n] for n in fmt.tensor_names()]
    torch.library.opcheck(S.dequantize, (data, fmt.spec(), list(q.shape), torch.float32))


@pytest.mark.parametrize("fmt", FORMATS[:5], ids=lambda f: f.spec())
def test_opcheck_packed_linear_and_equals_qlinear(fmt):
    q = _quantized(fmt)
    pw = R.repack_quantized(q)
    x = torch.randn(5, 64)
    args = (x, *pw.tensors(), None, pw.bits, pw.group_size, pw.in_features, pw.mode)
    torch.library.opcheck(S.packed_linear, args)
    y = S.packed_linear(*args)
    ref = x @ q.dequantize().float().t()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qdtype,thr", [(torch.int8, 0.0), (torch.int8, 6.0), (torch.float8_e4m3fn, 0.0)])
def test_opcheck_w8a8_linear(qdtype, thr):
    torch.manual_seed(2)
    x = torch.randn(6, 64) * 3
    if qdtype == torch.int8:
        qd = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    else:
        qd = (torch.randn(16, 64) * 50).clamp(-448, 448).to(qdtype)
    sw = torch.rand(16) * 1e-2 + 1e-3
    # opcheck's schema test multiplies its inputs, which torch does not implement for fp8 tensors.
    utils = ("test_faketensor", "test_autograd_registration") if qdtype != torch.int8 else \
        ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(S.w8a8_linear, (x, qd, sw, torch.randn(16), thr), test_utils=utils)


def test_w8a8_int8_reference_equals_format_linear():
    torch.manual_seed(3)
    fmt = Int8Rowwise(act=ActQuant("int8", "token"), threshold=6.0)
    q = fmt.quantize(torch.randn(16, 64))
    x = torch.randn(5, 64) * 3
    y = S.w8a8_linear(x, q["qdata"], q["scale"], None, 6.0)
    assert torch.equal(y, fmt.linear(x, q, None))


def test_opcheck_adamw8bit_step_and_matches_fp32_rule():
    from lowbit.optim.blockwise import dequantize_blockwise, quantize_blockwise, state_codebook
    from lowbit.optim.core import adam_rule

    torch.manual_seed(4)
    n = 700
    cm, cv = state_codebook(8, True), state_codebook(8, False)
    p, g = torch.randn(n), torch.randn(n) * 0.1
    mq, ma = quantize_blockwise(torch.randn(n) * 1e-2, cm, 256)
    vq, va = quantize_blockwise(torch.rand(n) * 1e-4, cv, 256)
    hp = (5, 1e-3, 0.9, 0.999, 1e-8, 0.01, 256)
    torch.library.opcheck(S.adamw8bit_step_, (p.clone(), g, mq.clone(), ma.clone(), vq.clone(), va.clone(), cm, cv,
                                              *hp), test_utils=("test_schema", "test_faketensor"))
    P, M, MA, V, VA = p.clone(), mq.clone(), ma.clone(), vq.clone(), va.clone()
    S.adamw8bit_step_(P, g, M, MA, V, VA, cm, cv, *hp)
    m = dequantize_blockwise(mq, ma, cm, (n,), 256)
    v = dequantize_blockwise(vq, va, cv, (n,), 256)
    p2 = p.clone()
    adam_rule(p2, g, m, v, t=5, lr=1e-3, β1=0.9, β2=0.999, ε=1e-8, λ=0.01, decoupled=True)
    assert torch.equal(P, p2)
    assert torch.equal(M, quantize_blockwise(m, cm, 256)[0]) and torch.equal(V, quantize_blockwise(v, cv, 256)[0])
