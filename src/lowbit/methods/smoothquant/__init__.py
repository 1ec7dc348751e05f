"""SmoothQuant (Xiao et al., arXiv 2211.10438): migrate activation outliers into the weights, then W8A8."""

from lowbit.methods.smoothquant.api import SmoothQuantConfig

__all__ = ["SmoothQuantConfig"]
