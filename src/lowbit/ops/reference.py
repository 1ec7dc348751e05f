"""Pure-PyTorch reference implementations: dequantize, then matmul. Runs everywhere; the test oracle."""

from __future__ import annotations

import torch

from lowbit.formats.base import QuantizedTensor, format_from_spec


def as_quantized(data: list[torch.Tensor], spec: str, shape: list[int], dtype: torch.dtype) -> QuantizedTensor:
    fmt = format_from_spec(spec)
    names = fmt.tensor_names()
    if len(names) != len(data):
        raise ValueError(f"format {fmt.kind} stores {list(names)}, got {len(data)} tensors")
    return QuantizedTensor(fmt, tuple(shape), dtype, dict(zip(names, data)))


def dequantize(data: list[torch.Tensor], spec: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    return as_quantized(data, spec, shape, dtype).dequantize().to(dtype).contiguous()


def qlinear(x: torch.Tensor, data: list[torch.Tensor], spec: str, shape: list[int], bias: torch.Tensor | None) -> torch.Tensor:
    fmt = format_from_spec(spec)
    if hasattr(fmt, "linear"):  # formats that quantize activations too (W8A8, LLM.int8()) own their matmul
        return fmt.linear(x, as_quantized(data, spec, shape, x.dtype), bias)
    W = dequantize(data, spec, shape, x.dtype)
    return torch.nn.functional.linear(x, W, None if bias is None else bias.to(x.dtype))


# -- kernel-layout ops (lowbit.ops.repack); the references the Triton kernels are tested against -------------

def packed_linear(x: torch.Tensor, q4: torch.Tensor, q2: torch.Tensor, q1: torch.Tensor, scale: torch.Tensor | None,
                  zero_point: torch.Tensor | None, codebook: torch.Tensor | None, perm: torch.Tensor | None,
                  bias: torch.Tensor | None, bits: int, group_size: int, in_features: int, mode: str) -> torch.Tensor:
    from lowbit.ops.repack import PackedWeight, dequantize_packed

    pw = PackedWeight(mode, bits, group_size, in_features, (q4 if q4.numel() else q2).shape[1], q4, q2, q1, scale,
                      zero_point, codebook, perm)
    W = dequantize_packed(pw, torch.float32).to(x.dtype)
    return torch.nn.functional.linear(x, W, None if bias is None else bias.to(x.dtype))


def w8a8_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                threshold: float) -> torch.Tensor:
    """int8 (per-token ``s_x = absmax/127``, LLM.int8() outlier columns if ``threshold > 0``) or FP8 W8A8."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    sw = scale.reshape(-1).to(torch.float32)
    if qdata.dtype == torch.int8:
        from lowbit.formats.int8_rowwise import int8_mixed_linear

        y = int8_mixed_linear(x2, qdata, sw, threshold if threshold > 0 else float("inf"))
    else:
        qmax = torch.finfo(qdata.dtype).max
        sx = (x2.abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-12)
        xq = (x2 / sx).clamp(-qmax, qmax).to(qdata.dtype)
        y = (xq.double() @ qdata.double().t()).float() * sx * sw.reshape(1, -1)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], qdata.shape[0])


def adamw8bit_step_(p: torch.Tensor, g: torch.Tensor, m_q: torch.Tensor, m_absmax: torch.Tensor, v_q: torch.Tensor,
                    v_absmax: torch.Tensor, code_m: torch.Tensor, code_v: torch.Tensor, step: int, lr: float,
                    beta1: float, beta2: float, eps: float, weight_decay: float, block_size: int) -> None:
    """Dequantize the 8-bit block-wise states, one fp32 AdamW step, requantize (arXiv 2110.02861 Sec. 2).

    The second moment is requantized with ``keep_nonzero`` (a nonzero v is never stored as the 0 code), exactly
    as :class:`lowbit.optim.AdamW8bit` stores it, so this op is that optimizer's step.
    """
    from lowbit.optim.blockwise import dequantize_blockwise, quantize_blockwise
    from lowbit.optim.core import adam_rule

    m = dequantize_blockwise(m_q, m_absmax, code_m, p.shape, block_size, 8)
    v = dequantize_blockwise(v_q, v_absmax, code_v, p.shape, block_size, 8)
    adam_rule(p, g.to(torch.float32), m, v, t=step, lr=lr, β1=beta1, β2=beta2, ε=eps, λ=weight_decay,
              decoupled=True)
    mq, ma = quantize_blockwise(m, code_m, block_size, 8)
    vq, va = quantize_blockwise(v, code_v, block_size, 8, keep_nonzero=True)  # as lowbit.optim stores v
    m_q.copy_(mq.view_as(m_q))
    v_q.copy_(vq.view_as(v_q))
    m_absmax.copy_(ma)
    v_absmax.copy_(va)
