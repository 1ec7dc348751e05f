"""FP8 W8A8 after "FP8 Quantization: The Power of the Exponent" (Kuzmin et al., arXiv 2208.09225)."""

from lowbit.methods.fp8.api import FP8Config

__all__ = ["FP8Config"]
