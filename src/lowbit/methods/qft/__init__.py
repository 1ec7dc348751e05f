"""QFT (arXiv 2310.07147): full-parameter tuning with int8 weights, gradients and Lion momentum."""

from lowbit.methods.qft.api import QFTConfig, QFTEmbedding, QFTLinear, QFTLion, apply_qft

__all__ = ["QFTConfig", "QFTEmbedding", "QFTLinear", "QFTLion", "apply_qft"]
