"""SpQR (arXiv 2306.03078): ``core.py`` the math, ``api.py`` the config."""

from lowbit.methods.spqr.api import SpQRConfig

__all__ = ["SpQRConfig"]
