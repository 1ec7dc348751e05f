"""Methods: one package per paper, each ``core.py`` (tensor math) + ``api.py`` (config + apply).

Importing this package registers every built-in method (one import line per method below).
"""

from lowbit.methods.base import MethodConfig, get_method, method_registry

__all__ = ["MethodConfig", "get_method", "method_registry"]

# -- built-in methods register here (keep one line each, alphabetical) --
from lowbit.methods import awq as _awq  # noqa: E402,F401
from lowbit.methods import fp8 as _fp8  # noqa: E402,F401
from lowbit.methods import gptq as _gptq  # noqa: E402,F401
from lowbit.methods import hqq as _hqq  # noqa: E402,F401
from lowbit.methods import llm_int8 as _llm_int8  # noqa: E402,F401
from lowbit.methods import loftq as _loftq  # noqa: E402,F401
from lowbit.methods import nf4 as _nf4  # noqa: E402,F401
from lowbit.methods import peqa as _peqa  # noqa: E402,F401
from lowbit.methods import q8bert as _q8bert  # noqa: E402,F401
from lowbit.methods import qa_lora as _qa_lora  # noqa: E402,F401
from lowbit.methods import qft as _qft  # noqa: E402,F401
from lowbit.methods import rtn as _rtn  # noqa: E402,F401
from lowbit.methods import smoothquant as _smoothquant  # noqa: E402,F401
from lowbit.methods import zeroquant_fp as _zeroquant_fp  # noqa: E402,F401
from lowbit.methods import spqr as _spqr  # noqa: E402,F401
from lowbit.methods import squeezellm as _squeezellm  # noqa: E402,F401
