"""Custom ops (``torch.library``): schemas with fakes, pure-PyTorch references, Triton kernels for CUDA."""

from lowbit.ops.schema import dequantize, qlinear

__all__ = ["dequantize", "qlinear"]
