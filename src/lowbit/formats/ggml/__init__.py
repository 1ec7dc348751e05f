"""GGML block types (llama.cpp's quantized tensor formats), byte-exact with ``ggml-quants.c``.

Array-level API (used by the GGUF reader and writer):

* :func:`dequantize_raw` — raw block bytes of a GGUF tensor → float32 torch tensor.
* :func:`quantize_raw` — float32 ``(rows, cols)`` → raw block bytes ``(rows, bytes_per_row)``, optionally
  guided by an importance matrix, exactly as llama.cpp's ``ggml_quantize_chunk``.

Each type is also a lowbit :class:`~lowbit.formats.base.Format` (``Q4_K()``, ...), see
:mod:`lowbit.formats.ggml.format`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from lowbit.formats.ggml.jit import NonFiniteInput, all_finite
from lowbit.formats.ggml.types import GGML_TYPES, GGML_TYPES_BY_ID, GGMLType, ggml_type

__all__ = ["dequantize_raw", "quantize_raw", "GGML_TYPES", "GGML_TYPES_BY_ID", "GGMLType", "ggml_type"]

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 17  # per quantizer call: keeps the search's arrays in cache
_THREADS = min(8, os.cpu_count() or 1)


def _gguf_fallback(name: str):
    """gguf-py's quantization-type enum member for a type lowbit does not implement (IQ2/IQ3/IQ1, MXFP4...)."""
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is a dependency of the GGUF features
        return None
    return getattr(gguf.GGMLQuantizationType, name.upper(), None) if isinstance(name, str) else None


def dequantize_raw(raw: np.ndarray, type_name: str | int, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode the raw bytes of a GGML tensor.

    Args:
        raw: uint8 array (any shape; e.g. gguf-py's ``(rows, bytes_per_row)`` view) holding exactly
            ``prod(shape) / block_size * type_size`` bytes.
        type_name: upstream type name (``"Q4_K"``) or ``ggml_type`` id.
        shape: logical shape in numpy/PyTorch order; the last dimension is the row (ggml ``ne[0]``).

    Returns:
        float32 tensor of ``shape``.

    Raises:
        ValueError: unknown type, a row length that is not a multiple of the block size, or a byte count
            that does not match ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raw = np.ascontiguousarray(raw).view(np.uint8)
    try:
        t = ggml_type(type_name)
    except ValueError:
        fb = _gguf_fallback(type_name)  # type: ignore[arg-type]
        if fb is None:
            raise
        import gguf.quants

        bs, ts = gguf.GGML_QUANT_SIZES[fb]
        _check_bytes(raw, shape, bs, ts, str(type_name))
        out = gguf.quants.dequantize(raw.reshape(-1, shape[-1] // bs * ts), fb)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)
    _check_bytes(raw, shape, t.block_size, t.type_size, t.name)
    blocks = np.ascontiguousarray(raw).reshape(-1, t.type_size)
    n = blocks.shape[0]
    step = max(1, _CHUNK_ELEMENTS // t.block_size)
    out = np.empty((n, t.block_size), dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf f16 scales in a file decode to NaN/Inf
        for i in range(0, n, step):
            out[i:i + step] = t.dequantize(blocks[i:i + step])
    return torch.from_numpy(out).reshape(shape)


def _check_bytes(raw: np.ndarray, shape: tuple[int, ...], bs: int, ts: int, name: str) -> None:
    if not shape or any(s < 0 for s in shape):
        raise ValueError(f"invalid tensor shape {shape}")
    if shape[-1] % bs:
        raise ValueError(f"{name} stores rows in blocks of {bs}; row length {shape[-1]} (shape {shape}) is not a multiple")
    need = math.prod(shape) // bs * ts
    if raw.size != need:
        raise ValueError(f"{name} tensor of shape {shape} needs {need} bytes, got {raw.size}")


def check_imatrix(imatrix: np.ndarray | torch.Tensor | None, cols: int) -> np.ndarray | None:
    """Validate an importance vector ``(cols,)``: finite, non-negative. Returns float32 numpy or None."""
    if imatrix is None:
        return None
    qw = imatrix.detach().cpu().numpy() if isinstance(imatrix, torch.Tensor) else np.asarray(imatrix)
    qw = qw.astype(np.float32).reshape(-1)
    if qw.shape[0] != cols:
        raise ValueError(f"importance matrix has {qw.shape[0]} values, the weight has {cols} input columns")
    if not np.isfinite(qw).all() or (qw < 0).any():
        raise ValueError("importance matrix must be finite and non-negative (mean of squared activations)")
    return qw


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``n`` worker threads (starting threads per call cost more than small tensors).
    Keyed by process id too: a forked child inherits the pool object but not its threads."""
    key = (os.getpid(), n)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = ThreadPoolExecutor(n, thread_name_prefix="lowbit-ggml")
        return _POOLS[key]


def quantize_raw(x: torch.Tensor | np.ndarray, type_name: str | int, imatrix: np.ndarray | torch.Tensor | None = None,
                 threads: int | None = None) -> np.ndarray:
    """Quantize rows exactly as llama.cpp's ``ggml_quantize_chunk`` does.

    Args:
        x: ``(rows, cols)`` float weights (converted to float32); ``cols`` must be a multiple of the
            type's block size.
        type_name: upstream type name or id.
        imatrix: optional ``(cols,)`` importance (per-column mean of squared activations); ignored by
            types whose reference quantizer ignores it (Q8_0, TQ*, float types).
        threads: row chunks quantized in parallel (the compiled block loops release the GIL); default
            ``min(8, os.cpu_count())``.

    Returns:
        ``(rows, cols / block_size * type_size)`` uint8.

    Raises:
        ValueError: unknown type, non-2-D or non-finite input, a row not divisible into blocks, or a bad
            importance vector.
    """
    t = ggml_type(type_name)
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point, got {x.dtype}")
        xn = x.detach().to(torch.float32).cpu().numpy()
    else:
        xn = np.asarray(x, dtype=np.float32)
    if xn.ndim != 2:
        raise ValueError(f"x must be 2-D (rows, cols), got shape {tuple(xn.shape)}")
    rows, cols = xn.shape
    if cols % t.block_size:
        fits = sorted(n for n, o in GGML_TYPES.items() if cols % o.block_size == 0)
        raise ValueError(f"{t.name} needs rows that are a multiple of {t.block_size}; got {cols}. Types that fit: {fits}")
    qw = check_imatrix(imatrix, cols) if t.uses_imatrix else None
    n_threads = _THREADS if threads is None else int(threads)
    if n_threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    out = np.empty((rows, t.row_bytes(cols)), dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    if t.single_pass and qw is None:  # no cache sizing needed, and each call costs ~0.2 ms of numpy set-up
        step = max(1, -(-rows // n_threads))
    xn = np.ascontiguousarray(xn)

    def work(i: int) -> bool:
        chunk = xn[i:i + step]
        if t.block_size > 1 and not t.checks_finite and not all_finite(chunk):
            return False
        try:
            out[i:i + step] = t.quantize(chunk, qw).reshape(-1, t.row_bytes(cols))
        except NonFiniteInput:
            return False
        return True

    starts = range(0, rows, step)
    if n_threads > 1 and len(starts) > 1:  # the block kernels and numpy release the GIL; chunks are independent
        finite = all(list(_pool(n_threads).map(work, starts)))
    else:
        finite = all([work(i) for i in starts])
    if not finite:
        raise ValueError(f"x has {int((~np.isfinite(xn)).sum())} NaN/Inf value(s); cannot quantize to {t.name}")
    return out
