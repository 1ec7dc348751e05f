"""W8A8 on tensor cores: int8 (SmoothQuant, LLM.int8()) through ``torch._int_mm`` and FP8 through
``torch._scaled_mm``, with Triton kernels for the per-token activation quantization and the scale epilogue.

Semantics follow :class:`lowbit.formats.int8_rowwise.Int8Rowwise` exactly (per-token ``s_x = absmax/127``
clamped at 1e-12, ``round(x / s_x)`` half-to-even; LLM.int8() outlier columns = columns holding any
``|x| ≥ threshold``, excluded from the int8 product and multiplied in fp32 against the dequantized weight
columns), so the int8 codes and the int32 product are bit-exact against the reference.
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
def _i8_mm_kernel(a_ptr, b_ptr, sx_ptr, sw_ptr, out_ptr, M, N, K,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """Fused int8 GEMM: ``a (M, K) int8 · b (N, K)ᵀ int8`` -> int32 accumulators -> scaled bf16."""
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
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :] * K + offs_k[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BK)):
        mk = offs_k < K - k * BK
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & mk[None, :], other=0)
        b = tl.load(b_ptrs, mask=(offs_n[None, :] < N) & mk[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BK
        b_ptrs += BK
    sx = tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=offs_n < N, other=0.0)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def quantize_rows(x2: torch.Tensor, qdtype: torch.dtype, threshold: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token quantization of ``x2 (M, K)``: ``(q (M, K), s_x (M, 1) fp32, outlier column mask | None)``."""
    M, K = x2.shape
    is_fp8 = qdtype != torch.int8
    qmax = 448.0 if qdtype == torch.float8_e4m3fn else 57344.0 if qdtype == torch.float8_e5m2 else 127.0
    q = torch.empty((M, K), device=x2.device, dtype=qdtype)
    s = torch.empty((M, 1), device=x2.device, dtype=torch.float32)
    col = None
    if threshold > 0:
        col = (x2.abs().amax(dim=0) >= threshold).to(torch.int8)
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


def int8_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                threshold: float = 0.0, fused: bool = True) -> torch.Tensor:
    """W8A8 int8: ``x (..., K)``, ``qdata (N, K) int8``, ``scale (N,) fp32`` -> ``(..., N)`` in x's dtype.

    ``fused=True`` (default, M >= 16) uses the Triton int8 GEMM with the scales in its epilogue (no int32 round
    trip; outlier columns then added in the input's precision); otherwise ``torch._int_mm`` (cuBLAS int8)
    followed by the scale epilogue kernel (outliers in fp32).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    M, K = x2.shape
    N = qdata.shape[0]
    xq, sx, col = quantize_rows(x2, torch.int8, threshold)
    cols = torch.nonzero(col).flatten() if col is not None else None
    sw = scale.reshape(-1).to(torch.float32)
    if fused and M >= 16:
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
        BM, BN, BK = 128, 128, 128
        grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
        _i8_mm_kernel[grid](xq, qdata, sx, sw, out, M, N, K, BM=BM, BN=BN, BK=BK, GROUP_M=8,
                            num_warps=8, num_stages=4)
        if cols is not None and cols.numel():  # LLM.int8() outlier columns, in the input's precision
            W_o = (qdata[:, cols].to(torch.float32) * scale.reshape(-1, 1)).to(x.dtype)
            out.addmm_(x2[:, cols], W_o.t())
        if bias is not None:
            out += bias.to(out.dtype)
        return out.reshape(*lead, N)
    extra = None
    if cols is not None and cols.numel():
        W_o = qdata[:, cols].to(torch.float32) * scale.reshape(-1, 1)
        extra = x2[:, cols].to(torch.float32) @ W_o.t()
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
