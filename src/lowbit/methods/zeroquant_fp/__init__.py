"""ZeroQuant-FP (Wu, Yao, He, arXiv 2307.09782): W4A8 with FP4 weights, FP8 activations, LoRC."""

from lowbit.methods.zeroquant_fp.api import ZeroQuantFPConfig

__all__ = ["ZeroQuantFPConfig"]
