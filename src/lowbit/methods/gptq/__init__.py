"""GPTQ (arXiv 2210.17323): ``core.py`` the math, ``api.py`` the config."""

from lowbit.methods.gptq.api import GPTQConfig

__all__ = ["GPTQConfig"]
