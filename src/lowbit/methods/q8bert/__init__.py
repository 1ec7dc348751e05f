"""Q8BERT (arXiv 1910.06188): 8-bit symmetric quantization-aware training for BERT encoders."""

from lowbit.methods.q8bert.api import Q8BERTConfig, QATEmbedding, QATLinear, apply_q8bert, calibrate, export_int8

__all__ = ["Q8BERTConfig", "QATEmbedding", "QATLinear", "apply_q8bert", "calibrate", "export_int8"]
