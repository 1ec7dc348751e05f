"""LLM.int8() (Dettmers et al., arXiv 2208.07339): vector-wise int8 with mixed-precision outlier columns."""

from lowbit.methods.llm_int8.api import LLMInt8Config

__all__ = ["LLMInt8Config"]
