"""Fine-tuning with quantization: the training loop, data, loss plots and merged export.

A package of its own (DESIGN's tree has none) because QLoRA, LoftQ, QA-LoRA, PEQA and QFT share one loop,
one data path and one set of outputs (loss plot, peft adapter, metrics), and none of that belongs in a
method's ``core.py`` (pure math) or in ``nn/`` (layers). ``finetune`` is the single function the CLI's
``lowbit finetune`` calls.
"""

from lowbit.train.data import ByteTokenizer, token_blocks
from lowbit.train.finetune import METHODS, FinetuneResult, StepInfo, eval_loss, finetune

__all__ = ["ByteTokenizer", "FinetuneResult", "METHODS", "StepInfo", "eval_loss", "finetune", "token_blocks"]
