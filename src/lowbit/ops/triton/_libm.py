"""Correctly rounded division, square root and round-half-even for the Triton kernels.

Triton's ``/`` and ``tl.sqrt`` on fp32 are approximate on CUDA; kernels that must equal a PyTorch reference
bit for bit use libdevice's ``div_rn``/``sqrt_rn``/``rint``. The interpreter (``TRITON_INTERPRET=1``, used to
check kernels on a CPU) has no libdevice; it computes in IEEE numpy, where plain operators are correctly rounded.
"""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

_INTERP = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _div_rn(a, b):
    if _INTERP:
        return a / b
    else:
        return libdevice.div_rn(a, b)


@triton.jit
def _sqrt_rn(a):
    if _INTERP:
        return tl.sqrt(a)
    else:
        return libdevice.sqrt_rn(a)


@triton.jit
def _rint(a):
    if _INTERP:
        return tl.floor(a + 0.5)  # ties are measure-zero on random data; the GPU path rounds half to even
    else:
        return libdevice.rint(a)
