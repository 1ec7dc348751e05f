"""HQQ: half-quadratic quantization (calibration-free zero-point optimization)."""

from lowbit.methods.hqq.api import HQQConfig

__all__ = ["HQQConfig"]
