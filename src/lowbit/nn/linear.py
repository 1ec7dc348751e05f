"""``QuantLinear``: a Linear layer whose weight is a typed :class:`~lowbit.formats.base.QuantizedTensor`.

The stored tensors are registered as buffers under their vocabulary names (``qdata``, ``scale``, ...), so
``state_dict``, ``.to()`` and safetensors work without special cases. Nothing is quantized here: a
``QuantLinear`` is built from an already quantized tensor (:meth:`from_quantized`), never in ``__init__``,
``.to()`` or ``load_state_dict``.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats.base import Format, QuantizedTensor
from lowbit.ops import cpu as cpu_ops
from lowbit.ops import qlinear

__all__ = ["QuantLinear"]


class QuantLinear(nn.Module):
    """``y = x @ Wᵀ + b`` with ``W`` stored in a lowbit format; forward calls ``lowbit::qlinear``.

    Args:
        qweight: the quantized weight, ``shape == (out_features, in_features)``.
        bias: optional float bias ``(out_features,)``.
    """

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(qweight.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight, got shape {qweight.shape}")
        self.format: Format = qweight.format
        self.out_features, self.in_features = int(qweight.shape[0]), int(qweight.shape[1])
        self.compute_dtype = qweight.dtype
        self._names = qweight.format.tensor_names()
        for name in self._names:
            self.register_buffer(name, qweight[name])
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._spec = self.format.spec()

    @classmethod
    def from_quantized(cls, qweight: QuantizedTensor, bias: torch.Tensor | None = None) -> "QuantLinear":
        return cls(qweight, bias)

    @property
    def qweight(self) -> QuantizedTensor:
        return QuantizedTensor(self.format, (self.out_features, self.in_features), self.compute_dtype,
                               dict(zip(self._names, self._data())))

    def dequantize(self) -> torch.Tensor:
        return self.qweight.dequantize()

    @property
    def bits_per_weight(self) -> float:
        return self.qweight.bits_per_weight

    def _data(self) -> list[torch.Tensor]:
        """The stored tensors in the format's order. Read from ``_buffers`` directly: ``nn.Module.__getattr__`` cost
        ~1.4 µs a tensor (5.9 µs for NF4's four against 0.3 µs, measured), on every call of a layer whose whole CPU
        kernel takes 10-30 µs at the default model's shapes. A name that is no longer a buffer (made a parameter or a
        plain attribute since) is read the ordinary way."""
        b = self._buffers
        try:
            return [b[n] for n in self._names]
        except KeyError:
            return [getattr(self, n) for n in self._names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = self._data()
        shape = [self.out_features, self.in_features]
        if x.device.type == "cpu" and cpu_ops.enabled() and not self._wants_grad(x, data) \
                and not torch.compiler.is_compiling():
            # the op's CPU kernel itself, without the dispatcher (nothing for autograd to record)
            return cpu_ops.qlinear(x, data, self._spec, shape, self.bias)
        return qlinear(x, data, self._spec, shape, self.bias)

    def _wants_grad(self, x: torch.Tensor, data: list[torch.Tensor]) -> bool:
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(t.requires_grad for t in data) or (
            self.bias is not None and self.bias.requires_grad)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format.kind}, "
                f"bits_per_weight={self.bits_per_weight:.3f}, bias={self.bias is not None}")
