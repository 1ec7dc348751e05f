"""Methods: one package per paper, each ``core.py`` (tensor math) + ``api.py`` (config + apply).

Importing this package registers every built-in method (one import line per method below).
"""

from lowbit.methods.base import MethodConfig, get_method, method_registry

__all__ = ["MethodConfig", "get_method", "method_registry"]

# -- built-in methods register here (keep one line each, alphabetical) --
