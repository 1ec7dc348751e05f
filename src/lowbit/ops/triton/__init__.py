"""Triton kernels registered as the CUDA implementations of the ``lowbit::`` ops.

:func:`register_if_available` is called when :mod:`lowbit.ops.schema` is imported; it does nothing unless
both ``triton`` and a CUDA device are present, and even then it only imports the kernel modules (Triton
compiles a kernel on its first call, never at import).

Registered for ``"cuda"``:

- ``lowbit::packed_linear`` -> :mod:`.wq` (GEMV split-K for M <= 4, fused dequant + ``tl.dot`` below
  M = 1024, Triton dequant + cuBLAS above);
- ``lowbit::w8a8_linear`` -> :mod:`.w8a8` (fused Triton int8 GEMM with the LLM.int8() outliers in its
  epilogue, ``torch._int_mm`` below M = 16, ``torch._scaled_mm`` for FP8; Triton activation quantization);
- ``lowbit::adamw8bit_step_`` -> :mod:`.adam8` (one fused pass);
- ``lowbit::qlinear`` -> repack once (cached per stored ``qdata`` tensor) and call the above for the
  formats that have a kernel layout; every other format runs the reference.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

log = logging.getLogger(__name__)
_REGISTERED = False
_ENABLED = True

__all__ = ["available", "register_if_available", "set_enabled"]


def set_enabled(enabled: bool) -> None:
    """Route ``lowbit::qlinear`` on CUDA through the Triton kernels (default) or the reference (False)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def available() -> bool:
    """True when triton is installed and a CUDA device is visible."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def register_if_available() -> bool:
    """Register the Triton CUDA kernels once; returns whether they are registered."""
    global _REGISTERED
    if _REGISTERED:
        return True
    if not available():
        return False
    _register()
    _REGISTERED = True
    return True


_ATTR = "_lowbit_triton_packed"  # the kernel layout lives on the stored qdata tensor, and dies with it


def _packed_for(data: list[torch.Tensor], spec: str, shape: list[int]):  # type: ignore[no-untyped-def]
    """Kernel layout for a stored weight, or None when its format has none (cached on ``data[0]``)."""
    from lowbit.ops.reference import as_quantized
    from lowbit.ops.repack import repack_quantized

    key = data[0]
    stamp = (spec, tuple(t.data_ptr() for t in data), tuple(t._version for t in data))
    hit = getattr(key, _ATTR, None)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    try:
        pw = repack_quantized(as_quantized(data, spec, shape, torch.float32))
    except ValueError as e:
        log.debug("no Triton layout for %s: %s", spec, e)
        pw = None
    setattr(key, _ATTR, (stamp, pw))
    return pw


def _register() -> None:
    from lowbit.ops import reference
    from lowbit.ops.repack import PackedWeight
    from lowbit.ops.triton import adam8, w8a8, wq

    @torch.library.register_kernel("lowbit::packed_linear", "cuda")
    def _packed_linear(x, q4, q2, q1, scale, zero_point, codebook, perm, bias, bits, group_size, in_features,  # type: ignore[no-untyped-def]
                       mode):
        N = (q4 if q4.numel() else q2).shape[1]
        pw = PackedWeight(mode, bits, group_size, in_features, N, q4, q2, q1, scale, zero_point, codebook, perm)
        return wq.packed_linear(x, pw, bias)

    @torch.library.register_kernel("lowbit::w8a8_linear", "cuda")
    def _w8a8_linear(x, qdata, scale, bias, threshold):  # type: ignore[no-untyped-def]
        if qdata.dtype == torch.int8:
            return w8a8.int8_linear(x, qdata, scale, bias, threshold)
        return w8a8.fp8_linear(x, qdata, scale, bias)

    @torch.library.register_kernel("lowbit::adamw8bit_step_", "cuda")
    def _adamw8bit_step_(p, g, m_q, m_absmax, v_q, v_absmax, code_m, code_v, step, lr, beta1, beta2, eps,  # type: ignore[no-untyped-def]
                         weight_decay, block_size):
        adam8.adamw8bit_step_(p, g, m_q, m_absmax, v_q, v_absmax, code_m, code_v, step, lr, beta1, beta2, eps,
                              weight_decay, block_size)

    @torch.library.register_kernel("lowbit::qlinear", "cuda")
    def _qlinear(x, data, spec, shape, bias):  # type: ignore[no-untyped-def]
        ok = _ENABLED and x.dtype in (torch.float16, torch.bfloat16)
        pw = _packed_for(data, spec, shape) if ok else None
        if pw is None:
            return reference.qlinear(x, data, spec, shape, bias)
        return wq.packed_linear(x, pw, bias)
