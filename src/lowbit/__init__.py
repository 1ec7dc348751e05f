"""lowbit: quantize large language models with every major method, behind one API."""

from lowbit.config import Config, ConfigError
from lowbit.formats import Format, QuantizedTensor
from lowbit.methods import MethodConfig, get_method, method_registry
from lowbit.nn import QuantLinear
from lowbit.io.checkpoint import save
from lowbit.io.gguf_export import export_gguf
from lowbit.loading import load, load_with_tokenizer
from lowbit.quantize import quantize_

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "Format", "MethodConfig", "QuantLinear", "QuantizedTensor", "export_gguf", "get_method",
           "load", "load_with_tokenizer", "method_registry", "quantize_", "save", "__version__"]
