"""Triton CUDA kernels against the reference ops on fresh random inputs (run on a CUDA machine: -m gpu)."""

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from lowbit.formats.affine import IntAffine  # noqa: E402
from lowbit.formats.codebook import Codebook, RowCodebook  # noqa: E402
from lowbit.ops import reference as ref  # noqa: E402
from lowbit.ops import repack as R  # noqa: E402
from lowbit.ops.triton import adam8, w8a8, wq  # noqa: E402

# bf16 activations and a bf16-rounded weight tile: ‖y − ref‖/‖ref‖ lands near 2e-3 (measured on H100).
TOL = 1e-2
FORMATS = [IntAffine(bits=4, group_size=128), IntAffine(bits=4, group_size=128, symmetric=True),
           IntAffine(bits=4, group_size=64, float_zero_point=True), IntAffine(bits=3, group_size=128),
           IntAffine(bits=2, group_size=64), IntAffine(bits=4, group_size=None), Codebook("nf4", 64, True),
           RowCodebook(4), RowCodebook(3)]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.spec())
@pytest.mark.parametrize("path,M", [("gemv", 1), ("gemv", 3), ("mm", 16), ("mm", 100), ("mmt", 100), ("dequant", 64),
                                    ("dequant:256", 64)])
@pytest.mark.parametrize("K", [576, 1536])
def test_packed_linear_matches_reference(fmt, path, M, K):
    torch.manual_seed(K + M)
    q = fmt.quantize(torch.randn(320, K))  # quantize and repack on the CPU (the formats' reference device)
    pw = R.repack_quantized(q).to("cuda")
    W = q.dequantize().float().cuda()
    for _ in range(2):  # fresh inputs each time
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        y = wq.packed_linear(x, pw, None, path=path)
        assert torch.isfinite(y).all()
        assert rel(y, x.float() @ W.t()) < TOL


def test_act_order_gemv_and_mm():
    torch.manual_seed(0)
    K, gs = 1536, 128
    fmt = IntAffine(bits=4, group_size=gs)
    Wf = torch.randn(256, K)
    g_idx = (torch.randperm(K) // gs).to(torch.int32)
    q = fmt.quantize(Wf, g_idx=g_idx, **fmt.params(Wf)).to("cuda")
    pw = R.repack_quantized(q)
    W = q.dequantize().float()
    for M, path in ((1, "gemv"), (32, "mm"), (64, "dequant"), (100, "mmt")):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        assert rel(wq.packed_linear(x, pw, None, path=path), x.float() @ W.t()) < TOL


def test_qlinear_cuda_uses_packed_kernel_and_matches_reference():
    from lowbit.ops.schema import qlinear

    fmt = IntAffine(bits=4, group_size=128)
    q = fmt.quantize(torch.randn(256, 1024)).to("cuda")
    data = [q[n] for n in fmt.tensor_names()]
    x = torch.randn(2, 1024, device="cuda", dtype=torch.bfloat16)
    y = qlinear(x, data, fmt.spec(), [256, 1024], None)
    assert rel(y, ref.qlinear(x.float(), data, fmt.spec(), [256, 1024], None)) < TOL


@pytest.mark.parametrize("thr", [0.0, 6.0])
@pytest.mark.parametrize("fused", [True, False])
def test_int8_codes_bit_exact_and_output_close(thr, fused):
    torch.manual_seed(5)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    x[:, [3, 100]] *= 10
    qd = torch.randint(-127, 128, (256, 512), device="cuda", dtype=torch.int8)
    sw = torch.rand(256, device="cuda") * 1e-2 + 1e-3
    xq, sx, _ = w8a8.quantize_rows(x, torch.int8, thr)
    xc = x.cpu().float()
    xin = xc.masked_fill(xc.abs() >= thr, 0) if thr else xc
    s = (xin.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
    xq_ref = torch.round(xin / s).clamp(-127, 127).to(torch.int8)
    if thr:
        xq_ref[:, (xc.abs() >= thr).any(0)] = 0
    assert torch.equal(xq.cpu(), xq_ref)
    y = w8a8.int8_linear(x, qd, sw, None, thr, fused=fused)
    assert rel(y.cpu(), ref.w8a8_linear(x.cpu(), qd.cpu(), sw.cpu(), None, thr)) < TOL


def test_fp8_matches_reference():
    torch.manual_seed(6)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    qd = (torch.randn(256, 512, device="cuda") * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    sw = torch.rand(256, device="cuda") * 1e-3
    y = w8a8.fp8_linear(x, qd, sw)
    assert rel(y.cpu(), ref.w8a8_linear(x.cpu(), qd.cpu(), sw.cpu(), None, 0.0)) < TOL


def test_adamw8bit_fused_matches_reference():
    from lowbit.optim.blockwise import quantize_blockwise, state_codebook

    torch.manual_seed(7)
    n = 3 * 2**20 + 5
    cm, cv = state_codebook(8, True, "cuda"), state_codebook(8, False, "cuda")
    p, g = torch.randn(n, device="cuda"), torch.randn(n, device="cuda") * 0.01
    mq, ma = quantize_blockwise(torch.randn(n, device="cuda") * 1e-3, cm, 256)
    vq, va = quantize_blockwise(torch.rand(n, device="cuda") * 1e-5, cv, 256)
    hp = dict(step=3, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, block_size=256)
    A = [t.clone() for t in (p, mq, ma, vq, va)]
    B = [t.clone() for t in (p, mq, ma, vq, va)]
    ref.adamw8bit_step_(A[0], g, A[1], A[2], A[3], A[4], cm, cv, **hp)
    adam8.adamw8bit_step_(B[0], g, B[1], B[2], B[3], B[4], cm, cv, **hp)
    # fp32 rounding order (FMA contraction) differs: θ within 1 ulp-scale, a code off by one only at a tie.
    torch.testing.assert_close(B[0], A[0], rtol=1e-6, atol=1e-6)
    for a, b in ((A[1], B[1]), (A[3], B[3])):
        d = (a.int() - b.int()).abs()
        assert int(d.max()) <= 1 and int((d > 0).sum()) < n * 1e-4
    torch.testing.assert_close(B[2], A[2], rtol=1e-5, atol=0)
    torch.testing.assert_close(B[4], A[4], rtol=1e-5, atol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_first_guess_table_brackets_the_nearest_code(signed):
    """The bucket table of the fused step: lut[key(x)] <= #(midpoints < x) <= lut[key(x)] + D on hard values."""
    from lowbit.optim.blockwise import state_codebook

    code = state_codebook(8, signed, "cuda")
    lut, mid, D = adam8.first_guess_table(code)
    mid = mid.cpu()
    up = torch.nextafter(mid, torch.tensor(2.0))
    dn = torch.nextafter(mid, torch.tensor(-2.0))
    x = torch.cat([mid, up, dn, -mid, torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-8, -1e-8]),
                   torch.rand(100000) * 2 - 1, torch.rand(10000) * 1e-5]).clamp(-1, 1)
    u = x.view(torch.int32).to(torch.int64)
    key0, nk = (127 - adam8.FG_E) << adam8.FG_MB, (adam8.FG_E << adam8.FG_MB) + 1
    key = (((u & 0x7FFFFFFF) >> (23 - adam8.FG_MB)) - key0).clamp(0, nk - 1)
    key = torch.where(u < 0, key + nk, key)
    lo = lut.cpu().to(torch.int64)[key]
    want = torch.searchsorted(mid, x)
    assert bool(((lo <= want) & (want <= lo + D)).all())
    assert D <= 2  # the point of the table: at most two compares after one look-up


@pytest.mark.parametrize("bits", [4, 3])
def test_lut_row_gemv_default_tiles_at_model_width(bits):
    """Per-row look-up tables at a realistic width (some larger tiles mis-summed on the H100; defaults must not)."""
    torch.manual_seed(11)
    N, K = 2048, 4096
    codes = torch.randint(0, 1 << bits, (N, K), device="cuda", dtype=torch.uint8)
    lut = (torch.randn(N, 1 << bits, device="cuda") * 0.02).half()
    pw = R.repack_lut(codes, lut, bits)
    W = R.dequantize_packed(pw, torch.float32)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    assert rel(wq.packed_linear(x, pw, None, path="gemv"), x.float() @ W.t()) < TOL


@pytest.mark.parametrize("BN,BK", [(64, 256), (128, 128)])
def test_lut_row_gemv_one_vector_per_thread_tiles_are_right(BN, BK):
    """The two 4-bit per-row LUT tiles that mis-summed columns 3 mod 4 with 4 warps on the H100 (Triton 3.6):
    ``gemv_config`` gives them 8 warps, and their sums must match the reference in every column."""
    torch.manual_seed(12)
    N, K = 2048, 4096
    codes = torch.randint(0, 16, (N, K), device="cuda", dtype=torch.uint8)
    lut = (torch.randn(N, 16, device="cuda") * 0.02).half()
    pw = R.repack_lut(codes, lut, 4)
    W = R.dequantize_packed(pw, torch.float32)
    cfg = wq.gemv_config(N, K, pw.group_size, wq._sms(torch.device("cuda")), 4, "lut_row", BN=BN, BK=BK, split=2,
                         v=4)
    assert cfg["num_warps"] == 8
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    y = wq.gemv(x, pw, cfg)
    ref = x.float() @ W.t()
    assert rel(y, ref) < 1e-5  # fp32 split-K sums
    assert rel(y[:, 3::4], ref[:, 3::4]) < 1e-5


@pytest.mark.parametrize("fmt", [f for f in FORMATS if isinstance(f, IntAffine)], ids=lambda f: f.spec())
def test_gemv_v3_and_v4_decodes_match_reference(fmt):
    """The affine decodes (v3 mantissa, v4 exact exponent with and without the next tile's words prefetched, v5 =
    v4 on x prepared once per call) on fresh inputs, unmasked (EVEN) and masked tiles."""
    torch.manual_seed(13)
    for N, K in ((512, 4096), (320, 1536)):
        q = fmt.quantize(torch.randn(N, K))
        pw = R.repack_quantized(q).to("cuda")
        W = q.dequantize().float().cuda()
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        for v, pf in ((3, False), (4, False), (4, True), (5, False)):
            cfg = wq.gemv_config(N, K, pw.group_size, 132, pw.bits, pw.mode, v=v, split=2, pf=pf)
            assert rel(wq.gemv(x, pw, cfg), x.float() @ W.t()) < 3e-4  # v4 PMIN 12: ~6e-5 at worst (int2)


I8_TILE_CASES = [dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=3, GROUP_M=8, maxnreg=128),
                 dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=4, GROUP_M=16, maxnreg=128),
                 dict(BM=64, BN=128, BK=128, num_warps=4, num_stages=4, GROUP_M=8)]


@pytest.mark.parametrize("tiles", I8_TILE_CASES, ids=lambda t: "{BM}x{BN}x{BK}w{num_warps}".format(**t))
@pytest.mark.parametrize("K", [512, 576])  # 576 is not a multiple of BK: the masked K loop
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_int8_fused_epilogue_equals_float64_up_to_output_rounding(tiles, K, dtype):
    """The fused int8 GEMM with the LLM.int8() outlier product (fp32 outer products) and the bias in its epilogue,
    M and N not tile multiples: float64 arithmetic on the same int8 codes and outlier columns, up to the
    rounding of the output dtype (the outlier weight is not rounded to 16 bits)."""
    torch.manual_seed(K + len(str(dtype)))
    M, N = 200, 328
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    x[:, torch.randperm(K)[:5].cuda()] *= 10
    qd = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    sw = torch.rand(N, device="cuda") * 1e-2 + 1e-3
    bias = torch.randn(N, device="cuda", dtype=dtype)
    for thr in (6.0, 0.0):
        y = w8a8.int8_linear(x, qd, sw, bias, thr, tiles=tiles)
        assert y.dtype == dtype and y.shape == (M, N)
        xq, sx, col = w8a8.quantize_rows(x, torch.int8, thr)
        exact = (xq.double() @ qd.double().t()) * sx.double() * sw.double()[None, :] + bias.double()[None, :]
        if thr:
            c = torch.nonzero(col).flatten()
            assert 5 <= c.numel() < 20
            exact += x[:, c].double() @ (qd[:, c].double() * sw.double()[:, None]).t()
        tol = {torch.bfloat16: 3e-3, torch.float16: 5e-4, torch.float32: 1e-5}[dtype]
        assert rel(y, exact) < tol


def test_outlier_columns_flag_and_list_exactly_the_columns_holding_a_large_value():
    torch.manual_seed(21)
    x = torch.randn(300, 1000, device="cuda", dtype=torch.bfloat16)
    r, c = torch.randint(0, 300, (40,)), torch.randint(0, 1000, (40,))
    x[r[:20], c[:20]] = 6.0  # exactly the threshold counts
    x[r[20:30], c[20:30]] = -7.5
    x[r[30:], c[30:]] = 5.96875  # just below (bf16) does not
    want = (x.float().abs() >= 6.0).any(0)
    assert 20 <= int(want.sum()) <= 30
    flags = w8a8.outlier_columns(x, 6.0)
    assert torch.equal(flags.bool(), want)
    assert int(w8a8.outlier_columns(x * 0.5, 6.0).sum()) == int((x.float().abs() >= 12).any(0).sum())
    for f in (flags, torch.zeros_like(flags), torch.ones(9000, device="cuda", dtype=torch.int32),
              (torch.rand(9000, device="cuda") < 0.3).to(torch.int32)):  # 9000: three chunks of the compaction
        cols, count = w8a8.outlier_list(f)
        want = torch.nonzero(f).flatten()
        assert int(count) == want.numel() and torch.equal(cols[: want.numel()].long(), want)


@pytest.mark.parametrize("trans", [False, True])
def test_dequant_matmul_layouts_and_overlap_match_reference(trans):
    """Large-M dequantize+cuBLAS: the W-row buffer layout (``trans``) and the two-buffer side-stream overlap
    give the reference product, and the overlapped run equals the serial one exactly (a buffer reused too
    early would not)."""
    torch.manual_seed(22)
    K = 1536
    fmts = [IntAffine(bits=4, group_size=128), Codebook("nf4", 64, True)]
    for fmt in fmts:
        q = fmt.quantize(torch.randn(1160, K))  # 9 chunks of 128, the last one partial
        pw = R.repack_quantized(q).to("cuda")
        W = q.dequantize().float().cuda()
        x = torch.randn(96, K, device="cuda", dtype=torch.bfloat16)
        y = wq.dequant_matmul(x, pw, 128, trans, False)
        assert rel(y, x.float() @ W.t()) < TOL
        for _ in range(3):
            assert torch.equal(wq.dequant_matmul(x, pw, 128, trans, True), y)


def test_llm_int8_outlier_columns_beyond_the_packed_ones_are_exact():
    """More outlier columns than the epilogue packs (``cap``): the rest go through the gathered fp32 path."""
    torch.manual_seed(23)
    M, K, N = 150, 512, 200
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    x[:, torch.randperm(K)[:40].cuda()] *= 10
    qd = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    sw = torch.rand(N, device="cuda") * 1e-2 + 1e-3
    xq, sx, col = w8a8.quantize_rows(x, torch.int8, 6.0)
    c = torch.nonzero(col).flatten()
    assert c.numel() >= 30
    exact = (xq.double() @ qd.double().t()) * sx.double() * sw.double()[None, :]
    exact += x[:, c].double() @ (qd[:, c].double() * sw.double()[:, None]).t()
    for cap in (16, 64):
        y = w8a8.int8_linear(x, qd, sw, None, 6.0, tiles=dict(cap=cap))
        assert rel(y, exact) < 5e-4


def test_gemv_v5_act_order_and_several_rows_match_reference():
    """v5's x preparation applies act-order's permutation and zeroes the split-K output for every row (M <= 4)."""
    torch.manual_seed(24)
    K = 2048
    fmt = IntAffine(bits=4, group_size=128)
    Wf = torch.randn(384, K)
    q = fmt.quantize(Wf, g_idx=(torch.randperm(K) // 128).to(torch.int32), **fmt.params(Wf)).to("cuda")
    pw = R.repack_quantized(q)
    W = q.dequantize().float()
    for M in (1, 3):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        cfg = wq.gemv_config(384, K, pw.group_size, 132, 4, "affine", v=5, split=4)
        for _ in range(2):  # the output buffer is reused from the allocator: stale sums would show
            assert rel(wq.gemv(x, pw, cfg), x.float() @ W.t()) < 3e-4


AFFINE_ONE_PLANE = [IntAffine(bits=4, group_size=128), IntAffine(bits=4, group_size=128, symmetric=True),
                    IntAffine(bits=4, group_size=64, float_zero_point=True), IntAffine(bits=2, group_size=64)]


@pytest.mark.parametrize("fmt", AFFINE_ONE_PLANE, ids=lambda f: f.spec())
@pytest.mark.parametrize("opts", [dict(split=1, BN=32, stages=3), dict(split=1, BN=16, stages=4, tma=True),
                                  dict(split=1, BN=64, stages=1, tma=True, num_warps=8),
                                  dict(split=2, BN=64, stages=3, tma=True), dict(split=4, BN=32, stages=4)],
                         ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act-order"])
def test_gemv_one_launch_and_pipelined_loads_match_reference(fmt, opts, act_order):
    """Session 5's GEMV paths: split 1 (x's dtype written by the kernel), the K loop pipelined through shared
    memory (cp.async ``stages``, tensor-descriptor ``tma``), on weights whose N and K do not divide the tiles
    (the masked loop and TMA's zero fill past the plane's end) and on dividing ones."""
    if act_order and fmt.float_zero_point:
        pytest.skip("act-order is a GPTQ (integer zero point) layout")
    torch.manual_seed(31)
    for N, K in ((328, 1536), (200, 576), (512, 4096)):
        Wf = torch.randn(N, K)
        gs = fmt.group_size
        kw = dict(g_idx=(torch.randperm(K) // gs).to(torch.int32), **fmt.params(Wf)) if act_order else {}
        q = fmt.quantize(Wf, **kw)
        pw = R.repack_quantized(q).to("cuda")
        W = q.dequantize().float().cuda()
        cfg = wq.gemv_config(N, K, pw.group_size, 132, pw.bits, pw.mode, **opts)
        for M in (1, 3):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            y = wq.gemv(x, pw, cfg)
            assert y.dtype == (torch.bfloat16 if cfg["split"] == 1 else torch.float32)
            assert torch.isfinite(y).all()
            # bf16 output when split = 1 (its rounding, ~2e-3); fp32 split-K sums otherwise
            assert rel(y, x.float() @ W.t()) < (6e-3 if cfg["split"] == 1 else 3e-4)


@pytest.mark.parametrize("opts", [dict(split=1, BN=64, num_stages=4), dict(split=2, BN=128, num_stages=3),
                                  dict(split=1, BN=256, num_stages=3)],
                         ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_mm_v4_split_one_and_stages_match_reference(opts):
    torch.manual_seed(32)
    fmt = IntAffine(bits=4, group_size=128)
    for N, K in ((328, 1536), (512, 4096)):
        q = fmt.quantize(torch.randn(N, K))
        pw = R.repack_quantized(q).to("cuda")
        W = q.dequantize().float().cuda()
        cfg = wq.mm_config(16, N, K, 128, 132, v=4, **opts)
        for M in (16, 5):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            assert rel(wq.mm(x, pw, cfg), x.float() @ W.t()) < TOL


def test_three_bit_planes_once_equal_the_per_row_reads():
    """3-bit tiles with each plane's words loaded once (``RS3``) give the same dequantized weight, bit for bit,
    as the former per-K-row reads, in the large-M dequantize and the mm path (act-order too)."""
    torch.manual_seed(33)
    fmt = IntAffine(bits=3, group_size=128)
    K = 1536
    Wf = torch.randn(328, K)
    for kw in ({}, dict(g_idx=(torch.randperm(K) // 128).to(torch.int32), **fmt.params(Wf))):
        q = fmt.quantize(Wf, **kw)
        pw = R.repack_quantized(q).to("cuda")
        W = q.dequantize().float().cuda()
        old = wq.RS3
        try:
            wq.RS3 = True
            a = wq.dequantize_t(pw, torch.float32, unpermute=True)
            wq.RS3 = False
            b = wq.dequantize_t(pw, torch.float32, unpermute=True)
        finally:
            wq.RS3 = old
        assert torch.equal(a, b)
        assert torch.allclose(a, W.t(), rtol=1e-6, atol=1e-7)
        x = torch.randn(16, K, device="cuda", dtype=torch.bfloat16)
        xp = x if pw.perm is None else x.index_select(1, pw.perm.long())
        cfg = wq.mm_config(16, 328, K, 128, 132)
        assert rel(wq.mm(xp, pw, cfg), x.float() @ W.t()) < TOL
        one = wq.mm_config(16, 328, K, 128, 132, split=1)  # no atomics: the sums' order is fixed
        assert torch.equal(wq.mm(xp, pw, dict(one, RS3=True)), wq.mm(xp, pw, dict(one, RS3=False)))


@pytest.mark.parametrize("fmt", AFFINE_ONE_PLANE[:3], ids=lambda f: f.spec())
@pytest.mark.parametrize("opts", [dict(BN=128, split=4), dict(BN=64, split=1), dict(BN=256, split=2, num_warps=8),
                                  dict(BN=32, split=8), dict(BN=64, split=8, pfd=4), dict(BN=32, split=1, pfd=2),
                                  dict(BN=64, split=4, pfd=8, tiled=True), dict(BN=128, split=1, tiled=True)],
                         ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act-order"])
def test_gemv_v6_fp16x2_decode_matches_reference(fmt, opts, act_order):
    """GEMV v6 (codes decoded and multiplied two at a time in fp16x2, fp32 per word): fresh inputs of ordinary,
    large (|x| up to 3e4: the per-program power-of-two scale must keep the fp16 sums finite) and tiny size
    (1e-6: kept normal), masked and unmasked tiles, with and without L2 prefetch (``pfd``: the prefetched rows
    past the program's K range or the weight's columns are skipped); error within fp16 rounding of the word sums."""
    if act_order and fmt.float_zero_point:
        pytest.skip("act-order is a GPTQ (integer zero point) layout")
    torch.manual_seed(35)
    for N, K in ((328, 1536), (512, 4096), (200, 576)):
        Wf = torch.randn(N, K)
        kw = dict(g_idx=(torch.randperm(K) // fmt.group_size).to(torch.int32), **fmt.params(Wf)) if act_order else {}
        q = fmt.quantize(Wf, **kw)
        pw = R.repack_quantized(q).to("cuda")
        W = q.dequantize().float().cuda()
        cfg = wq.gemv_config(N, K, pw.group_size, 132, pw.bits, pw.mode, v=6, **opts)
        assert wq.gemv6_fits(pw, cfg["BK"])
        for M, mag in ((1, 1.0), (3, 1.0), (1, 3e4), (2, 1e-6)):
            x = (torch.randn(M, K, device="cuda") * mag).to(torch.bfloat16)
            x[:, 5] *= 8  # one column well above the rest
            y = wq.gemv(x, pw, cfg)
            assert torch.isfinite(y).all()
            err = rel(y, x.float() @ W.t())
            assert err < (6e-3 if cfg["split"] == 1 else 2e-3), err  # bf16 output when split = 1


def test_gemv_default_decode_by_shape_and_format():
    """The default GEMV decode follows the measured choice (affine 4-bit at N >= 8192: v6, with the L2 prefetch at
    N >= 16384 for 128-wide groups; v4 below N = 8192 and for other formats), and the default path matches the
    reference for each."""
    torch.manual_seed(36)
    K = 1024
    cases = [(IntAffine(bits=4, group_size=128), True, 8192, 6, 0), (IntAffine(bits=4, group_size=64,
             float_zero_point=True), False, 16384, 6, 0), (IntAffine(bits=4, group_size=128), False, 8192, 6, 0),
             (IntAffine(bits=4, group_size=128, symmetric=True), False, 16384, 6, 8),
             (IntAffine(bits=4, group_size=128), False, 4096, 4, 0), (IntAffine(bits=2, group_size=128), True, 8192, 4, 0)]
    for fmt, act, N, want, pfd in cases:
        Wf = torch.randn(N, K)
        kw = dict(g_idx=(torch.randperm(K) // fmt.group_size).to(torch.int32), **fmt.params(Wf)) if act else {}
        q = fmt.quantize(Wf, **kw)
        pw = R.repack_quantized(q).to("cuda")
        cfg = wq.gemv_config(N, K, pw.group_size, 132, pw.bits, pw.mode, act_order=pw.perm is not None)
        assert cfg["v"] == want and cfg.get("pfd", 0) == pfd, (fmt.spec(), act, N, cfg)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        assert rel(wq.packed_linear(x, pw), x.float() @ q.dequantize().float().cuda().t()) < TOL


def _shared_lut3(N, K, group):
    """A shared 8-entry table with a scale per group (no stored format has it; the kernel layout does)."""
    codes = torch.randint(0, 8, (N, K))
    cb = torch.sort(torch.randn(8))[0]
    scale = torch.rand(N, -(-K // group)) * 0.05 + 0.01
    return R.repack_lut(codes, cb, 3, scale, group)


V7_CASES = {"nf4-dq": lambda N, K: R.repack_quantized(Codebook("nf4", 64, True).quantize(torch.randn(N, K))),
            "nf4-g128": lambda N, K: R.repack_quantized(Codebook("nf4", 128, False).quantize(torch.randn(N, K))),
            "row4": lambda N, K: R.repack_quantized(RowCodebook(4).quantize(torch.randn(N, K))),
            "row3": lambda N, K: R.repack_quantized(RowCodebook(3).quantize(torch.randn(N, K))),
            "row2-fp32": lambda N, K: R.repack_quantized(RowCodebook(2, torch.float32).quantize(torch.randn(N, K))),
            "shared3-g64": lambda N, K: _shared_lut3(N, K, 64)}
V7_OPTS = [dict(), dict(BN=64, split=2), dict(BN=256, num_warps=2, split=3), dict(BN=128, BK=64, split=1),
           dict(BN=512, num_warps=4, split=8, f16t=False), dict(tiled=True), dict(BN=64, num_warps=2, split=1, tiled=True)]


@pytest.mark.parametrize("case", list(V7_CASES))
@pytest.mark.parametrize("opts", V7_OPTS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gemv_v7_byte_permute_tables_equal_the_reference_weights(case, opts, dtype):
    """GEMV v7 (tables read by ``prmt``): per-column (4/3/2-bit, fp16 and fp32 codebooks) and shared tables (NF4
    with and without double quantization, a 3-bit one), bf16 and fp16 x, M = 1..4, N and K that do not divide the
    tiles, x of ordinary, large and tiny size. The weights looked up are the reference's own (entries rounded once
    to x's dtype), so against float64 sums over those weights only the fp32 summation differs (split-K: fp32
    output, 1e-5); a split-1 output is rounded to x's dtype."""
    torch.manual_seed(41)
    for N, K in ((328, 1536), (200, 640 if case == "nf4-g128" else 576), (512, 4096)):  # NF4 blocks within rows
        pw = V7_CASES[case](N, K).to("cuda")
        cfg = wq.gemv_config(N, K, pw.group_size, 132, pw.bits, pw.mode, v=7, **opts)
        assert cfg["v"] == 7 and wq.gemv7_fits(pw, cfg["BK"], dtype), cfg
        W64 = R.dequantize_packed(pw, torch.float64)
        Wx = R.dequantize_packed(pw, torch.float32).to(dtype).double()  # the reference op's weight in x's dtype
        bf = dtype == torch.bfloat16  # (fp16: |y| must stay in fp16's normal range for a split-1 output)
        for M, mag in ((1, 1.0), (2, 3e4 if bf else 100.0), (3, 1e-6 if bf else 1e-2), (4, 1.0)):
            x = (torch.randn(M, K, device="cuda") * mag).to(dtype)
            y = wq.gemv(x, pw, cfg)
            ref = x.double() @ Wx.t()
            assert torch.isfinite(y).all()
            tol = 1e-5 if cfg["split"] > 1 else 8e-3
            assert rel(y, ref) < tol, (N, K, M, mag, rel(y, ref))
            if M == 1 and cfg["split"] > 1 and rel(Wx, W64) > 1e-4:  # the rounding shows: unrounded weights miss
                assert rel(y, x.double() @ W64.t()) > 10 * tol


def test_gemv_v7_one_hot_columns_are_the_reference_weights_bit_for_bit():
    """x = e_k (one entry 1.0, the rest tiny normal values far below the weights' rounding) returns column k
    of the reference's bf16 weight exactly: every looked-up entry is the reference's rounding, bit for bit."""
    torch.manual_seed(42)
    N, K = 640, 1024
    for case in ("nf4-dq", "row4", "row3"):
        pw = V7_CASES[case](N, K).to("cuda")
        Wb = R.dequantize_packed(pw, torch.float32).to(torch.bfloat16).float()
        for f16t in (True, False):
            cfg = wq.gemv_config(N, K, pw.group_size, 132, pw.bits, pw.mode, v=7, split=4, f16t=f16t)
            for k in (0, 7, 8, 15, 16, 33, 511, 1023):
                x = torch.full((1, K), 2.0**-100, device="cuda").to(torch.bfloat16)  # products vanish in fp32 sums
                x[0, k] = 1.0
                y = wq.gemv(x, pw, cfg)[0]
                nz = Wb[:, k] != 0  # (a zero weight leaves the tiny products' sum)
                assert torch.equal(y[nz], Wb[nz, k]), (case, f16t, k)
                assert bool((y[~nz].abs() < 2.0**-80).all())


def test_gemv_v7_falls_back_for_fp32_x_and_affine_codes():
    """v7 takes tables with bf16/fp16 x only: fp32 x and affine weights go to v4 (with v4's tiles), still right."""
    torch.manual_seed(43)
    N, K = 256, 1024
    for pw in (V7_CASES["row4"](N, K).to("cuda"), R.repack_quantized(IntAffine(bits=4, group_size=128).quantize(
            torch.randn(N, K))).to("cuda")):
        cfg = wq.gemv_config(N, K, pw.group_size, 132, pw.bits, pw.mode, v=7)
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(2, K, device="cuda", dtype=dt)
            W = R.dequantize_packed(pw, torch.float32)
            assert rel(wq.gemv(x, pw, cfg), x.float() @ W.t()) < TOL


TILED_CASES = {"int4-asym": lambda N, K: IntAffine(bits=4, group_size=128),
               "int4-sym": lambda N, K: IntAffine(bits=4, group_size=128, symmetric=True),
               "hqq-g64": lambda N, K: IntAffine(bits=4, group_size=64, float_zero_point=True),
               "act-order": lambda N, K: IntAffine(bits=4, group_size=128),
               "nf4-dq": lambda N, K: Codebook("nf4", 64, True), "row4": lambda N, K: RowCodebook(4),
               "row3": lambda N, K: RowCodebook(3)}


@pytest.mark.parametrize("case", list(TILED_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gemv_column_tiled_layout_equals_the_weights_own_layout(case, dtype):
    """Session 7: GEMV v6 (affine 4-bit) and v7 (tables) reading the column-tiled copies (``tiled=True``) compute
    what they compute on the weight's own layout — at split 1 (x's dtype) within one rounding of the output (the two
    compiles may vectorize the loads differently where N is not a multiple of 16, and so sum a thread's words in
    another order; at 8192×28672 they are the same), with split-K within 1e-5 — and match the reference op on fresh
    inputs, for N and K that do not divide the tiles
    (the last column tile is padded), act-order, HQQ's float zero point, bf16 and fp16 x, M = 1..4; with split-K
    (atomics) within fp32 summation order of the reference. The tiled copy is built once per weight and tile width."""
    torch.manual_seed(44)
    fmt = TILED_CASES[case](0, 0)
    for N, K in ((200, 576), (328, 1536), (96, 4096)):
        Wf = torch.randn(N, K)
        kw = dict(g_idx=(torch.randperm(K) // 128).to(torch.int32), **fmt.params(Wf)) if case == "act-order" else {}
        q = fmt.quantize(Wf, **kw)
        pw = R.repack_quantized(q).to("cuda")
        W = R.dequantize_packed(pw, torch.float32)
        g = lambda **o: wq.gemv_config(N, K, pw.group_size, 132, pw.bits, pw.mode, **o)  # noqa: E731
        v = 6 if pw.mode == "affine" else 7
        for M in (1, 2, 4):
            x = (torch.randn(M, K, device="cuda")).to(dtype)
            ref = x.double() @ W.double().t()
            for o in (dict(BN=64, split=1), dict(BN=32, split=1, num_warps=1), dict(BN=128, split=1, pfd=2)):
                if v == 7 and "pfd" in o:
                    continue
                a = wq.gemv(x, pw, g(v=v, **o))
                b = wq.gemv(x, pw, g(v=v, tiled=True, **o))
                ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
                assert torch.allclose(a.float(), b.float(), rtol=ulp, atol=1e-6 * float(ref.abs().max())), \
                    (case, N, K, M, o, float((a.float() - b.float()).abs().max()))
                assert rel(b, ref) < 8e-3, (case, N, K, M, o, rel(b, ref))  # x's dtype, rounded once
            for o in (dict(BN=64, split=4), dict(BN=32, split=8, num_warps=1)):
                y = wq.gemv(x, pw, g(v=v, tiled=True, **o))
                assert y.dtype == torch.float32 and torch.isfinite(y).all()
                assert rel(y, wq.gemv(x, pw, g(v=v, **o))) < 1e-5
                assert rel(y, ref) < (2e-3 if v == 6 else 1e-2), (case, N, K, M, o, rel(y, ref))
        t = R.tiled_columns(pw.q4 if pw.q4.numel() else pw.q2, 64)
        assert R.tiled_columns(pw.q4 if pw.q4.numel() else pw.q2, 64) is t  # built once per weight and BN


@pytest.mark.parametrize("case", ["int4-asym", "act-order", "hqq-g64", "nf4-dq", "row4", "row3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gemv_serial_split_k_is_deterministic_and_matches_reference(case, dtype):
    """Session 7 ``serial`` split-K (v6/v7): each split stores its sums, the last to finish a column tile adds them in
    a fixed order and writes x's dtype. On fresh inputs with ragged N and K, M = 1..4: the output is x's dtype, the
    same bit for bit over repeated calls (the counters reset themselves; no order dependence) and under a CUDA-graph
    replay, equal to the atomic split-K result rounded once (within one rounding), and within tolerance of the
    reference."""
    torch.manual_seed(45)
    fmt = TILED_CASES[case](0, 0)
    for N, K in ((200, 576), (328, 1536)):
        Wf = torch.randn(N, K)
        kw = dict(g_idx=(torch.randperm(K) // 128).to(torch.int32), **fmt.params(Wf)) if case == "act-order" else {}
        q = fmt.quantize(Wf, **kw)
        pw = R.repack_quantized(q).to("cuda")
        W = R.dequantize_packed(pw, torch.float32)
        v = 6 if pw.mode == "affine" else 7
        for o in (dict(BN=64, split=4), dict(BN=32, split=3, num_warps=1), dict(BN=64, split=8, tiled=True)):
            cfg = wq.gemv_config(N, K, pw.group_size, 132, pw.bits, pw.mode, v=v, serial=True, **o)
            assert cfg["split"] > 1
            for M in (1, 3, 4):
                x = torch.randn(M, K, device="cuda").to(dtype)
                y = wq.gemv(x, pw, cfg)
                assert y.dtype == dtype and torch.isfinite(y).all()
                for _ in range(3):
                    assert torch.equal(wq.gemv(x, pw, cfg), y), (case, N, K, M, o)
                cnt = [t for k, t in wq._SERIAL_WS.items() if k[2:] == (M, cfg["split"], N, -(-N // cfg["BN"]))]
                assert cnt and all(int(c[1].abs().sum()) == 0 for c in cnt)  # every counter back to 0
                a = wq.gemv(x, pw, dict(cfg, serial=False))  # the atomic fp32 sums
                assert a.dtype == torch.float32
                assert rel(y, a.to(dtype)) < 8e-3
                assert rel(y, x.double() @ W.double().t()) < 8e-3, (case, N, K, M, o)
        x = torch.randn(2, K, device="cuda").to(dtype)
        cfg = wq.gemv_config(N, K, pw.group_size, 132, pw.bits, pw.mode, v=v, serial=True, split=4)
        st = torch.cuda.Stream()
        st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            eager = wq.gemv(x, pw, cfg)
        torch.cuda.current_stream().wait_stream(st)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y1 = wq.gemv(x, pw, cfg)
            y2 = wq.gemv(x, pw, cfg)
        g.replay()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y1, eager) and torch.equal(y2, eager)


def test_gemv_tiled_flag_makes_tables_and_act_order_read_column_tiles():
    """``wq.GEMV_TILED`` (off by default: a second copy of the weight) turns the column-tiled layout on in the default
    GEMV config for look-up tables and act-order weights only; the default path then still matches the reference."""
    torch.manual_seed(46)
    N, K = 328, 1536
    fmts = [(Codebook("nf4", 64, True), False, True), (RowCodebook(3), False, True),
            (IntAffine(bits=4, group_size=128), True, True), (IntAffine(bits=4, group_size=128), False, False)]
    old = wq.GEMV_TILED
    try:
        for flag in (False, True):
            wq.GEMV_TILED = flag
            wq.gemv_config.cache_clear()
            for fmt, act, want in fmts:
                Wf = torch.randn(N, K)
                kw = dict(g_idx=(torch.randperm(K) // 128).to(torch.int32), **fmt.params(Wf)) if act else {}
                q = fmt.quantize(Wf, **kw)
                pw = R.repack_quantized(q).to("cuda")
                cfg = wq.gemv_config(N, K, pw.group_size, 132, pw.bits, pw.mode, act_order=pw.perm is not None)
                assert bool(cfg.get("tiled")) == (flag and want), (fmt.spec(), act, flag, cfg)
                x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
                assert rel(wq.packed_linear(x, pw), x.float() @ q.dequantize().float().cuda().t()) < TOL
    finally:
        wq.GEMV_TILED = old
        wq.gemv_config.cache_clear()
