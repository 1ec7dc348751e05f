"""W8A8 on tensor cores: int8 (SmoothQuant, LLM.int8()) through a fused Triton int8 GEMM (default for M >= 16)
or ``torch._int_mm``, and FP8 through ``torch._scaled_mm``, with Triton kernels for the per-token activation
quantization, the LLM.int8() outlier columns (flagged, listed and packed on the device) and the epilogues.

Semantics follow :class:`lowbit.formats.int8_rowwise.Int8Rowwise` exactly (per-token ``s_x = absmax/127``
clamped at 1e-12, ``round(x / s_x)`` half-to-even; LLM.int8() outlier columns = columns holding any
``|x| ≥ threshold``, excluded from the int8 product and multiplied against the dequantized weight columns with
fp32 accumulation), so the int8 codes and the int32 product are bit-exact against the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.ops.triton._libm import _div_rn, _rint


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, col_out_ptr, K, stride_xm, threshold, QMAX: tl.constexpr,
                       IS_FP8: tl.constexpr, HAS_OUT: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: absmax (outlier entries excluded), scale, quantize (outlier columns -> 0)."""
    m = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mk = offs < K
    x = tl.load(x_ptr + m * stride_xm + offs, mask=mk, other=0.0).to(tl.float32)
    if HAS_OUT:
        xin = tl.where(tl.abs(x) >= threshold, 0.0, x)
    else:
        xin = x
    amax = tl.max(tl.abs(xin), axis=0)
    s = tl.maximum(_div_rn(amax, QMAX), 1e-12)
    if IS_FP8:
        q = tl.clamp(_div_rn(xin, s), -QMAX, QMAX).to(q_ptr.dtype.element_ty)
    else:
        q = tl.clamp(_rint(_div_rn(xin, s)), -QMAX, QMAX)
        if HAS_OUT:
            col = tl.load(col_out_ptr + offs, mask=mk, other=0)
            q = tl.where(col != 0, 0.0, q)
        q = q.to(tl.int8)
    tl.store(q_ptr + m * K + offs, q, mask=mk)
    tl.store(s_ptr + m, s)


@triton.jit
def _epilogue_kernel(acc_ptr, sx_ptr, sw_ptr, bias_ptr, extra_ptr, out_ptr, M, N,
                     HAS_BIAS: tl.constexpr, HAS_EXTRA: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """``out = acc · s_x[m] · s_w[n] (+ extra) (+ bias)`` in fp32, stored in out's dtype."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    mm = offs_m < M
    mn = offs_n < N
    msk = mm[:, None] & mn[None, :]
    acc = tl.load(acc_ptr + offs_m[:, None] * N + offs_n[None, :], mask=msk, other=0).to(tl.float32)
    sx = tl.load(sx_ptr + offs_m, mask=mm, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=mn, other=0.0)
    y = acc * sx[:, None] * sw[None, :]
    if HAS_EXTRA:
        y = y + tl.load(extra_ptr + offs_m[:, None] * N + offs_n[None, :], mask=msk, other=0.0)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=mn, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _col_flags_kernel(x_ptr, flag_ptr, M, K, stride_xm, threshold, BM: tl.constexpr, BK: tl.constexpr):
    """``flag[k] = 1`` where column ``k`` of ``x (M, K)`` holds any ``|x| >= threshold`` (one pass, no temporaries)."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    mk = offs_k < K
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=(offs_m[:, None] < M) & mk[None, :],
                other=0.0).to(tl.float32)
    hit = tl.max((tl.abs(x) >= threshold).to(tl.int32), axis=0)
    tl.atomic_max(flag_ptr + offs_k, hit, mask=mk & (hit > 0))


@triton.jit
def _compact_kernel(flag_ptr, cols_ptr, count_ptr, K, CH: tl.constexpr):
    """Indices of the flagged columns, in order, into ``cols`` and their number into ``count`` (one program, on
    the device: no host synchronisation)."""
    base = 0
    for k0 in range(0, K, CH):
        offs = k0 + tl.arange(0, CH)
        f = tl.load(flag_ptr + offs, mask=offs < K, other=0)
        pos = base + tl.cumsum(f, axis=0) - f
        tl.store(cols_ptr + pos, offs, mask=f > 0)
        base += tl.sum(f, axis=0)
    tl.store(count_ptr, base)


@triton.jit
def _outlier_pack_kernel(x_ptr, q_ptr, sw_ptr, cols_ptr, count_ptr, xo_ptr, wo_ptr, M, N, K, stride_xm,
                         C: tl.constexpr, BR: tl.constexpr):
    """The first ``min(count, C)`` outlier columns as dense operands for the GEMM epilogue (zeros beyond):
    ``xo (M, C)`` = x's columns, ``wo (N, 2C)`` = ``[hi, lo]`` with ``hi`` = ``q·s_w`` rounded to x's dtype and
    ``lo`` = what ``hi`` missed, rounded (the weight to ~2⁻¹⁷ relative through two 16-bit dots)."""
    pid = tl.program_id(0)
    n_xp = tl.cdiv(M, BR)
    j = tl.arange(0, C)
    mj = j < tl.minimum(tl.load(count_ptr), C)
    c = tl.load(cols_ptr + j, mask=mj, other=0)
    if pid < n_xp:
        r = pid * BR + tl.arange(0, BR)
        mr = r < M
        v = tl.load(x_ptr + r[:, None] * stride_xm + c[None, :], mask=mr[:, None] & mj[None, :], other=0.0)
        tl.store(xo_ptr + r[:, None] * C + j[None, :], v, mask=mr[:, None])
    else:
        r = (pid - n_xp) * BR + tl.arange(0, BR)
        mr = r < N
        q = tl.load(q_ptr + r[:, None] * K + c[None, :], mask=mr[:, None] & mj[None, :], other=0)
        w = q.to(tl.float32) * tl.load(sw_ptr + r, mask=mr, other=0.0)[:, None]
        hi = w.to(wo_ptr.dtype.element_ty)
        lo = (w - hi.to(tl.float32)).to(wo_ptr.dtype.element_ty)
        tl.store(wo_ptr + r[:, None] * (2 * C) + j[None, :], hi, mask=mr[:, None])
        tl.store(wo_ptr + r[:, None] * (2 * C) + C + j[None, :], lo, mask=mr[:, None])


@triton.jit
def _i8_mm_kernel(a_ptr, b_ptr, sx_ptr, sw_ptr, out_ptr, x_ptr, cols_ptr, count_ptr, xo_ptr, wo_ptr, bias_ptr,
                  M, N, K, stride_xm,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                  EVEN_K: tl.constexpr, HAS_OUT: tl.constexpr, C: tl.constexpr, IEEE: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
    """Fused int8 GEMM: ``a (M, K) int8 · b (N, K)ᵀ int8`` -> int32 accumulators -> ``acc·s_x·s_w`` in fp32,
    plus (LLM.int8()) the outlier columns' product accumulated onto it in the epilogue, plus the bias; stored
    once in out's dtype.

    Outliers: ``count`` columns listed in ``cols`` (both on the device). The first ``C`` of them come packed
    by :func:`_outlier_pack_kernel` (``xo``, ``wo = [hi, lo]``) and are added by 16-deep tensor-core dots
    ``x_O·hi + x_O·lo`` with fp32 accumulation (one IEEE fp32 dot for fp32 inputs, where ``lo`` is zero);
    any beyond ``C`` by fp32 outer products gathered from ``x`` and the codes (correct, slow: session 4 run 3
    measured 640 µs for 8 columns that way at 2048×8192×28672 — random reads of the weight per tile).

    Rows and columns past M / N are read modulo M / N (always in bounds, never stored), so the main loop's
    loads are unmasked when ``K % BK == 0`` (``EVEN_K``)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    gm = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gm
    pid_n = (pid % group) // gm
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rm = offs_m % M
    rn = offs_n % N
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + rm[:, None] * K + offs_k[None, :]
    b_ptrs = b_ptr + rn[None, :] * K + offs_k[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            mk = offs_k < K - k0
            a = tl.load(a_ptrs, mask=mk[None, :], other=0)
            b = tl.load(b_ptrs, mask=mk[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BK
        b_ptrs += BK
    sx = tl.load(sx_ptr + rm)
    sw = tl.load(sw_ptr + rn)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_OUT:
        n_o = tl.load(count_ptr)
        ok = tl.arange(0, 16)
        for j0 in range(0, tl.minimum(n_o, C), 16):  # packed columns: 16-deep tensor-core dots
            xo = tl.load(xo_ptr + rm[:, None] * C + (j0 + ok)[None, :])
            hi = tl.load(wo_ptr + rn[None, :] * (2 * C) + (j0 + ok)[:, None])
            lo = tl.load(wo_ptr + rn[None, :] * (2 * C) + C + (j0 + ok)[:, None])
            if IEEE:
                y = tl.dot(xo, hi, y, input_precision="ieee")
            else:
                y = tl.dot(xo, hi, y)
                y = tl.dot(xo, lo, y)
        for j in range(C, n_o):  # columns past the packed ones (rare): fp32 outer products, gathered
            c = tl.load(cols_ptr + j)
            xv = tl.load(x_ptr + rm * stride_xm + c).to(tl.float32)
            wv = tl.load(b_ptr + rn * K + c).to(tl.float32) * sw
            y += xv[:, None] * wv[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def outlier_columns(x2: torch.Tensor, threshold: float) -> torch.Tensor:
    """int32 ``(K,)`` flags: 1 for the columns of ``x2 (M, K)`` holding any ``|x| >= threshold``."""
    M, K = x2.shape
    flags = torch.zeros(K, device=x2.device, dtype=torch.int32)
    BM, BK = 64, 128
    _col_flags_kernel[(triton.cdiv(M, BM), triton.cdiv(K, BK))](x2, flags, M, K, x2.stride(0), float(threshold),
                                                                BM=BM, BK=BK, num_warps=4)
    return flags


def quantize_rows(x2: torch.Tensor, qdtype: torch.dtype, threshold: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token quantization of ``x2 (M, K)``: ``(q (M, K), s_x (M, 1) fp32, outlier column flags | None)``."""
    M, K = x2.shape
    is_fp8 = qdtype != torch.int8
    qmax = 448.0 if qdtype == torch.float8_e4m3fn else 57344.0 if qdtype == torch.float8_e5m2 else 127.0
    q = torch.empty((M, K), device=x2.device, dtype=qdtype)
    s = torch.empty((M, 1), device=x2.device, dtype=torch.float32)
    col = outlier_columns(x2, threshold) if threshold > 0 else None
    BLOCK = triton.next_power_of_2(K)
    _quant_rows_kernel[(M,)](x2, q, s, col if col is not None else q, K, x2.stride(0), float(threshold),
                             QMAX=qmax, IS_FP8=is_fp8, HAS_OUT=threshold > 0, BLOCK=BLOCK,
                             num_warps=8 if BLOCK >= 4096 else 4)
    return q, s, col


def scale_epilogue(acc: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
                   extra: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    M, N = acc.shape
    out = torch.empty((M, N), device=acc.device, dtype=dtype)
    BM, BN = 32, 128
    _epilogue_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        acc, sx, sw, bias if bias is not None else sx, extra if extra is not None else acc, out, M, N,
        HAS_BIAS=bias is not None, HAS_EXTRA=extra is not None, BM=BM, BN=BN, num_warps=4)
    return out


# int8 GEMM tiles (H100 sweep, benchmarks/NOTES_gpu.md session 4: 1028 -> 828 µs at 2048×8192×28672). Triton
# makes an int8 wgmma synchronous (it pipelines only fp32 accumulators), so a second resident CTA per SM (3 stages
# of 32 KB, at most 128 registers) is what hides each K step's wait.
I8_TILES = dict(BM=128, BN=128, BK=128, GROUP_M=16, num_warps=8, num_stages=3, maxnreg=128)


def outlier_list(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cols (K,) int32, count (1,) int32)``: the flagged columns' indices (first ``count`` entries) — on the
    device, without waiting for it."""
    K = flags.numel()
    cols = torch.empty(K, device=flags.device, dtype=torch.int32)
    count = torch.empty(1, device=flags.device, dtype=torch.int32)
    _compact_kernel[(1,)](flags, cols, count, K, CH=min(4096, triton.next_power_of_2(K)), num_warps=4)
    return cols, count


OUTLIER_CAP = 64  # outlier columns packed for the tensor-core epilogue; more are still exact, through gathers


def outlier_operands(x2: torch.Tensor, qdata: torch.Tensor, sw: torch.Tensor, cols: torch.Tensor,
                     count: torch.Tensor, cap: int = OUTLIER_CAP) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xo (M, cap), wo (N, 2·cap))`` packed from the device-side outlier list (:func:`_outlier_pack_kernel`)."""
    M, K = x2.shape
    N = qdata.shape[0]
    xo = torch.empty((M, cap), device=x2.device, dtype=x2.dtype)
    wo = torch.empty((N, 2 * cap), device=x2.device, dtype=x2.dtype)
    BR = 32
    _outlier_pack_kernel[(triton.cdiv(M, BR) + triton.cdiv(N, BR),)](
        x2, qdata, sw, cols, count, xo, wo, M, N, K, x2.stride(0), C=cap, BR=BR, num_warps=4)
    return xo, wo


def int8_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                threshold: float = 0.0, fused: bool = True, tiles: dict | None = None) -> torch.Tensor:
    """W8A8 int8: ``x (..., K)``, ``qdata (N, K) int8``, ``scale (N,) fp32`` -> ``(..., N)`` in x's dtype.

    ``fused=True`` (default, M >= 16) runs the Triton int8 GEMM with the scales, the LLM.int8() outlier columns'
    product (packed, 16-bit tensor-core dots on a hi/lo split weight, fp32 accumulation) and the bias all in its
    epilogue; the outlier columns are found and listed on the device, so
    nothing waits for the GPU. Otherwise ``torch._int_mm`` (cuBLAS int8) followed by the scale epilogue kernel
    (outliers in fp32). ``tiles`` overrides :data:`I8_TILES` (benchmarks).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    M, K = x2.shape
    N = qdata.shape[0]
    xq, sx, col = quantize_rows(x2, torch.int8, threshold)
    sw = scale.reshape(-1).to(torch.float32)
    if fused and M >= 16:
        t = dict(I8_TILES, **(tiles or {}))
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
        cols, count = outlier_list(col) if col is not None else (sx, sx)
        cap = t.get("cap", OUTLIER_CAP)
        xo, wo = outlier_operands(x2, qdata, sw, cols, count, cap) if col is not None else (out, out)
        BM, BN, BK = t["BM"], t["BN"], t["BK"]
        grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
        _i8_mm_kernel[grid](xq, qdata, sx, sw, out, x2, cols, count, xo, wo, bias if bias is not None else sw,
                            M, N, K, x2.stride(0), BM=BM, BN=BN, BK=BK, GROUP_M=t["GROUP_M"], EVEN_K=K % BK == 0,
                            HAS_OUT=col is not None, C=cap, IEEE=x.dtype == torch.float32,
                            HAS_BIAS=bias is not None, num_warps=t["num_warps"], num_stages=t["num_stages"],
                            **({"maxnreg": t["maxnreg"]} if t.get("maxnreg") else {}))
        return out.reshape(*lead, N)
    cols = torch.nonzero(col).flatten() if col is not None else None
    extra = None
    if cols is not None and cols.numel():
        W_o = qdata[:, cols.long()].to(torch.float32) * scale.reshape(-1, 1)
        extra = x2[:, cols.long()].to(torch.float32) @ W_o.t()
    if M > 16 and K % 8 == 0 and N % 8 == 0:
        acc = torch._int_mm(xq, qdata.t())
    else:  # cuBLAS int8 needs M > 16; exact in fp64 for tiny M (|acc| < 2^53)
        acc = (xq.double() @ qdata.double().t()).to(torch.int32)
    return scale_epilogue(acc, sx, sw, bias, extra, x.dtype).reshape(*lead, N)


def fp8_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
    """W8A8 FP8: ``qdata (N, K)`` e4m3/e5m2 with per-row ``scale (N,)``; per-token dynamic input scales."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    N = qdata.shape[0]
    xq, sx, _ = quantize_rows(x2, qdata.dtype)
    y = torch._scaled_mm(xq, qdata.t(), scale_a=sx, scale_b=scale.reshape(1, -1).to(torch.float32),
                         bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype)
    return y.reshape(*lead, N)
