"""PEQA (arXiv 2305.14152): fine-tune only the quantization scales of an integer-quantized model."""

from lowbit.methods.peqa.api import PEQAConfig, PEQALinear, apply_peqa, finish_peqa, scale_parameters

__all__ = ["PEQAConfig", "PEQALinear", "apply_peqa", "finish_peqa", "scale_parameters"]
