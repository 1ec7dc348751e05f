"""SqueezeLLM (arXiv 2306.07629): ``core.py`` the math, ``api.py`` the config."""

from lowbit.methods.squeezellm.api import SqueezeLLMConfig

__all__ = ["SqueezeLLMConfig"]
