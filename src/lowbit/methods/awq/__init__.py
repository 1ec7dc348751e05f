"""AWQ (Lin et al., arXiv 2306.00978): activation-aware per-channel scaling and clipping before rounding."""

from lowbit.methods.awq.api import AWQConfig

__all__ = ["AWQConfig"]
