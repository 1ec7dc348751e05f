"""Op definitions with their fake (meta) implementations.

Every hot op is a ``torch.library`` custom op. The default implementation registered here is the
pure-PyTorch reference (:mod:`lowbit.ops.reference`), which runs on every device and is the test oracle;
Triton kernels (``lowbit.ops.triton``) register CUDA implementations of the same ops.

``lowbit::qlinear(x, data, spec, shape, bias)``: ``y = x @ dequantize(W)ᵀ + bias`` where ``W`` is stored as
the tensors ``data`` (in ``format.tensor_names()`` order) of the format whose canonical JSON is ``spec``;
``shape = (out_features, in_features)``.
"""

from __future__ import annotations

import torch

from lowbit.ops import reference

__all__ = ["qlinear", "dequantize"]


@torch.library.custom_op("lowbit::dequantize", mutates_args=())
def dequantize(data: list[torch.Tensor], spec: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Dequantize stored tensors of the format ``spec`` into a ``shape`` tensor of ``dtype``."""
    return reference.dequantize(data, spec, shape, dtype)


@dequantize.register_fake
def _(data: list[torch.Tensor], spec: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    return data[0].new_empty(shape, dtype=dtype)


@torch.library.custom_op("lowbit::qlinear", mutates_args=())
def qlinear(x: torch.Tensor, data: list[torch.Tensor], spec: str, shape: list[int], bias: torch.Tensor | None) -> torch.Tensor:
    """Quantized linear layer: ``x: (..., in) -> (..., out)``."""
    return reference.qlinear(x, data, spec, shape, bias)


@qlinear.register_fake
def _(x: torch.Tensor, data: list[torch.Tensor], spec: str, shape: list[int], bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], shape[0]))


def _qlinear_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, data, spec, shape, bias = inputs
    ctx.save_for_backward(*data)
    ctx.spec, ctx.shape, ctx.has_bias = spec, shape, bias is not None


def _qlinear_backward(ctx, grad):  # type: ignore[no-untyped-def]
    # The quantized weight is frozen: only the input (and a bias) get gradients, as in QLoRA.
    saved = list(ctx.saved_tensors)  # read once: activation checkpointing allows a single unpack
    W = dequantize(saved, ctx.spec, ctx.shape, grad.dtype)
    grad_x = grad @ W
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, [None] * len(saved), None, None, grad_b  # one None per stored tensor (data is a list)


qlinear.register_autograd(_qlinear_backward, setup_context=_qlinear_setup)


# -- kernel-layout ops: fast paths with their own packed layouts (lowbit.ops.repack) -------------------------

@torch.library.custom_op("lowbit::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, q4: torch.Tensor, q2: torch.Tensor, q1: torch.Tensor, scale: torch.Tensor | None,
                  zero_point: torch.Tensor | None, codebook: torch.Tensor | None, perm: torch.Tensor | None,
                  bias: torch.Tensor | None, bits: int, group_size: int, in_features: int, mode: str) -> torch.Tensor:
    """``x (..., K) @ Wᵀ (+ bias)`` with ``W`` in the bit-plane kernel layout of :mod:`lowbit.ops.repack`."""
    return reference.packed_linear(x, q4, q2, q1, scale, zero_point, codebook, perm, bias, bits, group_size,
                                   in_features, mode)


@packed_linear.register_fake
def _(x, q4, q2, q1, scale, zero_point, codebook, perm, bias, bits, group_size, in_features, mode):  # type: ignore[no-untyped-def]
    return x.new_empty((*x.shape[:-1], (q4 if q4.numel() else q2).shape[1]))


@torch.library.custom_op("lowbit::w8a8_linear", mutates_args=())
def w8a8_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                threshold: float) -> torch.Tensor:
    """W8A8 with per-token dynamic input scales: int8 ``qdata`` (LLM.int8() if ``threshold > 0``) or FP8."""
    return reference.w8a8_linear(x, qdata, scale, bias, threshold)


@w8a8_linear.register_fake
def _(x, qdata, scale, bias, threshold):  # type: ignore[no-untyped-def]
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))


@torch.library.custom_op("lowbit::adamw8bit_step_", mutates_args=("p", "m_q", "m_absmax", "v_q", "v_absmax"))
def adamw8bit_step_(p: torch.Tensor, g: torch.Tensor, m_q: torch.Tensor, m_absmax: torch.Tensor, v_q: torch.Tensor,
                    v_absmax: torch.Tensor, code_m: torch.Tensor, code_v: torch.Tensor, step: int, lr: float,
                    beta1: float, beta2: float, eps: float, weight_decay: float, block_size: int) -> None:
    """One AdamW step on fp32 ``p`` with 8-bit block-wise ``m``/``v`` (codes + per-block absmax), in place."""
    reference.adamw8bit_step_(p, g, m_q, m_absmax, v_q, v_absmax, code_m, code_v, step, lr, beta1, beta2, eps,
                              weight_decay, block_size)


@adamw8bit_step_.register_fake
def _(p, g, m_q, m_absmax, v_q, v_absmax, code_m, code_v, step, lr, beta1, beta2, eps, weight_decay, block_size):  # type: ignore[no-untyped-def]
    return None


def _register_cuda_kernels() -> None:
    # Triton kernels only where CUDA and triton exist; importing them compiles nothing.
    from lowbit.ops.triton import register_if_available

    register_if_available()


_register_cuda_kernels()
