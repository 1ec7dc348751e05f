"""The Triton GEMV and dequantize kernels in Triton's interpreter, on the CPU (``TRITON_INTERPRET=1``, in a fresh
process so the switch does not leak): the session-5 paths (split 1, the K loop pipelined with ``stages``, TMA word
tiles, 3-bit planes loaded once) against the reference on shapes whose N and K do not divide the tiles, act-order
included. Needs Triton (absent from the default CPU environment: skipped there) and takes minutes (``slow``).
GEMV v6 is not covered here: its inline PTX does not run in the interpreter (GPU tests only)."""

import importlib.util
import os

import pytest

from tests.ops.fresh_process import expect_ok

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton's interpreter")]

CODE = r"""
import torch
from lowbit.formats.affine import IntAffine
from lowbit.ops import repack as R
from lowbit.ops.triton import wq

def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())

torch.manual_seed(0)
fmts = [IntAffine(bits=4, group_size=128), IntAffine(bits=4, group_size=64, float_zero_point=True),
        IntAffine(bits=2, group_size=128)]
opts = [dict(split=1, BN=32, stages=3), dict(split=2, BN=64, stages=2, tma=True), dict(split=1, BN=16, tma=True)]
for fmt in fmts:
    for (N, K), act in (((72, 384), True), ((40, 320), False)):  # N, K not multiples of the tiles
        Wf = torch.randn(N, K)
        kw = dict(g_idx=(torch.randperm(K) // fmt.group_size).to(torch.int32), **fmt.params(Wf)) if act else {}
        if act and fmt.float_zero_point:
            kw = {}
        q = fmt.quantize(Wf, **kw)
        pw = R.repack_quantized(q)
        W = q.dequantize().float()
        for o in opts:
            cfg = wq.gemv_config(N, K, pw.group_size, 132, pw.bits, pw.mode, **o)
            x = torch.randn(2, K, dtype=torch.float16)
            e = rel(wq.gemv(x, pw, cfg), x.float() @ W.t())
            assert e < (1e-3 if cfg["split"] == 1 else 1e-4), (fmt.spec(), N, K, o, e)  # fp16 output at split 1
q3 = IntAffine(bits=3, group_size=128).quantize(torch.randn(72, 384))
pw3 = R.repack_quantized(q3)
a = wq.dequantize_t(pw3, torch.float32, unpermute=True)
wq.RS3 = False
b = wq.dequantize_t(pw3, torch.float32, unpermute=True)
assert torch.equal(a, b) and torch.allclose(a, q3.dequantize().float().t(), rtol=1e-6, atol=1e-7)
print("ok")
"""


def test_gemv_and_dequantize_paths_in_the_triton_interpreter():
    expect_ok(CODE, env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        p for p in ("src", os.environ.get("PYTHONPATH", "")) if p)))
