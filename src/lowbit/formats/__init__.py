"""Formats: what the bits mean. Importing this package registers every built-in format."""

from lowbit.formats.base import Format, QuantizedTensor, format_registry

__all__ = ["Format", "QuantizedTensor", "format_registry"]

# -- built-in formats register here (keep one line each) --
import lowbit.formats.affine  # noqa: E402,F401
import lowbit.formats.codebook  # noqa: E402,F401
import lowbit.formats.fp8  # noqa: E402,F401
import lowbit.formats.int8_rowwise  # noqa: E402,F401
import lowbit.formats.minifloat  # noqa: E402,F401
import lowbit.formats.ggml.format  # noqa: E402,F401
import lowbit.formats.bilevel  # noqa: E402,F401
import lowbit.formats.outliers  # noqa: E402,F401
