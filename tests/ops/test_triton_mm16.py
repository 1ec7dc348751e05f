"""Small-M tensor-core kernel (lowbit.ops.triton.wq_mm16) against the reference on fresh random inputs (-m gpu)."""

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon")

from lowbit.formats.affine import IntAffine  # noqa: E402
from lowbit.formats.codebook import Codebook  # noqa: E402
from lowbit.ops import repack as R  # noqa: E402
from lowbit.ops.triton import wq_mm16  # noqa: E402

# The kernel's weights are exact ((c - z)·s in fp32, never rounded to bf16), so the error is the activations'
# and output's rounding: measured ~2-3e-3 in bf16; the tolerance is wq's tests' 1e-2.
TOL = 1e-2
FORMATS = [IntAffine(bits=4, group_size=128), IntAffine(bits=4, group_size=128, symmetric=True),
           IntAffine(bits=4, group_size=64, float_zero_point=True), IntAffine(bits=2, group_size=64),
           IntAffine(bits=2, group_size=128), IntAffine(bits=4, group_size=None)]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _weight(fmt, N, K, act_order=False, seed=0):
    torch.manual_seed(seed)
    Wf = torch.randn(N, K)
    kw = {}
    if act_order:
        kw["g_idx"] = (torch.randperm(K) // fmt.group_size).to(torch.int32)
    q = fmt.quantize(Wf, **kw, **(fmt.params(Wf) if act_order else {}))
    return R.repack_quantized(q).to("cuda"), q.dequantize().float().cuda()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.spec())
@pytest.mark.parametrize("K,N", [(576, 300), (1536, 320)])  # 576: not a multiple of 128; N 300: not of 32
@pytest.mark.parametrize("M", [5, 16, 33, 64])
def test_mm16_matches_reference(fmt, K, N, M):
    pw, W = _weight(fmt, N, K, seed=K + M)
    assert wq_mm16.fits(pw, M)
    for dtype in (torch.bfloat16, torch.float16):
        for _ in range(2):  # fresh inputs each time
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            y = wq_mm16.packed_linear(x, pw)
            assert y.dtype == dtype and y.shape == (M, N)
            assert torch.isfinite(y).all()
            assert rel(y, x.float() @ W.t()) < TOL


@pytest.mark.parametrize("M", [8, 16])
def test_mm16_act_order_matches_reference(M):
    pw, W = _weight(IntAffine(bits=4, group_size=128), 256, 1536, act_order=True, seed=M)
    assert pw.perm is not None
    x = torch.randn(M, 1536, device="cuda", dtype=torch.bfloat16)
    assert rel(wq_mm16.packed_linear(x, pw), x.float() @ W.t()) < TOL


@pytest.mark.parametrize("cfg", [dict(BR=64), dict(split=1), dict(split=2, BK=64), dict(BR=64, split=4, BK=32),
                                 dict(pf=True, pfx=False), dict(ws=True), dict(pf=True, ws=True, split=3),
                                 dict(pf=True, ws=True, BR=64, BK=64), dict(pf=True, pf2=True),
                                 dict(pf=True, pf2=True, ws=True, BK=64), dict(pf=True, pfx=True), dict(pf=False)],
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("N", [448, 300])
def test_mm16_tiles_match_reference(cfg, N):
    pw, W = _weight(IntAffine(bits=4, group_size=128), N, 2048, seed=3)
    for M in (7, 16):
        x = torch.randn(M, 2048, device="cuda", dtype=torch.bfloat16)
        assert rel(wq_mm16.mm16(x, pw, cfg), x.float() @ W.t()) < TOL


def test_mm16_is_closer_than_a_bf16_weight_one_hot():
    """One-hot rows of x pick single weights: the kernel's are exact (c - z)·s (no bf16 weight rounding), so
    the output is the float32 weight rounded once to bf16."""
    pw, W = _weight(IntAffine(bits=4, group_size=128), 256, 1024, seed=9)
    x = torch.zeros(16, 1024, device="cuda", dtype=torch.bfloat16)
    cols = torch.randperm(1024)[:16]
    x[torch.arange(16), cols] = 1.0
    y = wq_mm16.packed_linear(x, pw)
    assert torch.equal(y, W[:, cols.cuda()].t().to(torch.bfloat16))


def test_mm16_keeps_the_packed_linear_contract():
    pw, W = _weight(IntAffine(bits=4, group_size=128), 320, 576, seed=4)
    x = torch.randn(2, 8, 576, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(320, device="cuda", dtype=torch.bfloat16)
    y = wq_mm16.packed_linear(x, pw, bias)
    assert y.shape == (2, 8, 320)
    assert rel(y, x.float() @ W.t() + bias.float()) < TOL


def test_mm16_refuses_what_it_does_not_take():
    pw, _ = _weight(IntAffine(bits=3, group_size=128), 64, 256)
    assert not wq_mm16.fits(pw, 16)
    with pytest.raises(ValueError, match="affine 2/4-bit"):
        wq_mm16.mm16(torch.randn(16, 256, device="cuda", dtype=torch.bfloat16), pw)
    nf4 = Codebook("nf4", 64, True)
    q = nf4.quantize(torch.randn(64, 256))
    assert not wq_mm16.fits(R.repack_quantized(q).to("cuda"), 16)
    pw4, _ = _weight(IntAffine(bits=4, group_size=128), 64, 256)
    assert not wq_mm16.fits(pw4, 4) and not wq_mm16.fits(pw4, 65) and not wq_mm16.fits(pw4, 16, torch.float32)


@pytest.mark.parametrize("M", [4, 5, 16, 64, 65])
def test_packed_linear_routes_m5_to_64_affine_to_mm16(M, monkeypatch):
    """``wq.packed_linear`` (the op's CUDA kernel) sends 5 <= M <= 64 affine weights to mm16 by default, with the
    same result as calling it; NF4, M <= 4, M > 64 and ``MM16 = False`` keep their former paths."""
    from lowbit.ops.triton import wq

    calls = []
    real = wq_mm16.mm16
    monkeypatch.setattr(wq_mm16, "mm16", lambda x2, pw, cfg=None: calls.append(x2.shape[0]) or real(x2, pw, cfg))
    pw, W = _weight(IntAffine(bits=4, group_size=128), 320, 1536, act_order=True, seed=M)
    x = torch.randn(M, 1536, device="cuda", dtype=torch.bfloat16)
    y = wq.packed_linear(x, pw)
    assert rel(y, x.float() @ W.t()) < TOL
    routed = 5 <= M <= 64
    assert calls == ([M] if routed else [])
    if routed:  # split-K sums land by atomics in any order: equal to a direct call up to the output's rounding
        assert rel(y, real(x, pw)) < 4e-3
        monkeypatch.setattr(wq, "MM16", False)
        y_mm = wq.packed_linear(x, pw)
        assert calls == [M] and rel(y_mm, x.float() @ W.t()) < TOL
    nf4 = R.repack_quantized(Codebook("nf4", 64, True).quantize(torch.randn(320, 1536))).to("cuda")
    wq.packed_linear(x, nf4)
    assert len(calls) == (1 if routed else 0)


def test_wrong_feature_count_or_layout_is_refused_before_any_kernel():
    from lowbit.ops.triton import wq

    pw, _ = _weight(IntAffine(bits=4, group_size=128), 64, 256)
    for M in (1, 16, 2048):  # every path: gemv, mm16, dequant
        with pytest.raises(ValueError, match="features"):
            wq.packed_linear(torch.randn(M, 255, device="cuda", dtype=torch.bfloat16), pw)
    with pytest.raises(ValueError, match="in_features=256"):
        wq_mm16.mm16(torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)[:, ::2], pw)
