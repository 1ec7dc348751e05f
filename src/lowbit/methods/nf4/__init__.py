"""QLoRA storage: NF4 / FP4 block-wise with double quantization (bitsandbytes-compatible)."""

from lowbit.methods.nf4.api import FP4Config, NF4Config

__all__ = ["NF4Config", "FP4Config"]
