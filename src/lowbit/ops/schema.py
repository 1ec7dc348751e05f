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
    W = dequantize(list(ctx.saved_tensors), ctx.spec, ctx.shape, grad.dtype)
    grad_x = grad @ W
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, grad_b


qlinear.register_autograd(_qlinear_backward, setup_context=_qlinear_setup)
