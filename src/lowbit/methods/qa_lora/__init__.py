"""QA-LoRA (arXiv 2309.14717): LoRA over group-pooled inputs, merged exactly into float zero points."""

from lowbit.methods.qa_lora.api import QALoRAConfig, QALoRALinear, apply_qa_lora, merge_qa_lora

__all__ = ["QALoRAConfig", "QALoRALinear", "apply_qa_lora", "merge_qa_lora"]
