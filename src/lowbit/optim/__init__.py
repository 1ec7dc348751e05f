"""Optimizers with block-wise quantized (8-bit, 4-bit) or paged state (arXiv 2110.02861, 2305.14314)."""

from lowbit.optim.adam import (Adam, Adam4bit, Adam8bit, AdamW, AdamW4bit, AdamW8bit, PagedAdam, PagedAdam8bit,
                               PagedAdamW, PagedAdamW4bit, PagedAdamW8bit)
from lowbit.optim.base import QuantStateOptimizer, state_nbytes
from lowbit.optim.blockwise import dequantize_blockwise, quantize_blockwise, state_codebook
from lowbit.optim.lion import Lion, Lion4bit, Lion8bit, PagedLion, PagedLion8bit
from lowbit.optim.sgd import SGD, SGD4bit, SGD8bit

__all__ = ["SGD", "SGD4bit", "SGD8bit", "Adam", "Adam4bit", "Adam8bit", "AdamW", "AdamW4bit", "AdamW8bit", "Lion",
           "Lion4bit", "Lion8bit", "PagedAdam", "PagedAdam8bit", "PagedAdamW", "PagedAdamW4bit", "PagedAdamW8bit",
           "PagedLion", "PagedLion8bit", "QuantStateOptimizer", "dequantize_blockwise", "quantize_blockwise",
           "state_codebook", "state_nbytes"]
