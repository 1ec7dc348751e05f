"""LoftQ (arXiv 2310.08659): quantized base + LoRA initialised by alternating quantization and SVD."""

from lowbit.methods.loftq.api import LoftQConfig, apply_loftq, loftq_layer

__all__ = ["LoftQConfig", "apply_loftq", "loftq_layer"]
