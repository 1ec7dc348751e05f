"""Build and load the small hand-written C kernels of the CPU fast path (:mod:`lowbit.ops.cpu_lut4`,
:mod:`lowbit.ops.cpu_vnni`).

Each kernel is one C source string compiled on first use with the system C compiler (``$CC``, else ``cc``) into a
per-user cache directory (``$LOWBIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowbit``, else ``~/.cache/lowbit``),
named by a hash of source, compiler and flags, written atomically, and loaded with :mod:`ctypes`. Every source
exports ``int lowbit_cpu_ok(void)`` (``__builtin_cpu_supports`` of the instruction sets it needs), checked
before any kernel runs. No compiler, a failed build or a CPU without those instructions: :func:`load` returns
``None`` (logged once) and callers keep their other paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = ["load", "load_variant", "cache_dir", "as_rows", "like_input"]


def as_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x (..., K)`` as a contiguous ``(rows, K)`` tensor of ``dtype`` for a kernel: ``x`` itself when it already is
    one (the common decode call: no reshape, cast or copy, whose Python overhead is comparable to a small layer's
    kernel time)."""
    if x.dim() == 2 and x.dtype == dtype and x.is_contiguous():
        return x
    return x.reshape(-1, x.shape[-1]).to(dtype).contiguous()


def like_input(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A kernel's ``(rows, N)`` output in ``x``'s dtype and leading shape (no-ops skipped, as in :func:`as_rows`)."""
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if y.dtype == x.dtype else y.to(x.dtype)


def cache_dir() -> str:
    base = os.environ.get("LOWBIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lowbit")
    return os.path.join(base, "cpu_kernels")


def _compile(name: str, source: str, flags: tuple[str, ...]) -> str:
    cc = os.environ.get("CC", "cc")
    all_flags = ["-O3", *flags, "-fopenmp", "-shared", "-fPIC"]
    tag = hashlib.sha256("\0".join([source, cc, *all_flags, sys.platform]).encode()).hexdigest()[:16]
    d = cache_dir()
    so = os.path.join(d, f"{name}_{tag}.so")
    if not os.path.exists(so):
        logger.info("compiling CPU kernel %s once (a few seconds) into %s", name, d)
        os.makedirs(d, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            src = os.path.join(tmp, f"{name}.c")
            with open(src, "w") as f:
                f.write(source)
            out = os.path.join(tmp, f"{name}.so")
            r = subprocess.run([cc, *all_flags, src, "-o", out], capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise RuntimeError(f"{cc} failed: {r.stderr[-800:]}")
            os.replace(out, so)  # atomic: concurrent builders leave one complete file
    return so


@lru_cache(maxsize=None)
def load(name: str, source: str, flags: tuple[str, ...]) -> ctypes.CDLL | None:
    """The compiled library of ``source`` (cached per process), or ``None`` where it cannot run here."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        logger.info("CPU kernel %s: x86-64 only (this machine: %s); not used", name, platform.machine())
        return None
    try:
        lib = ctypes.CDLL(_compile(name, source, flags))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("CPU kernel %s not available (%s); the other CPU paths are used", name, e)
        return None
    lib.lowbit_cpu_ok.restype = ctypes.c_int
    if not lib.lowbit_cpu_ok():
        logger.info("CPU kernel %s: this CPU lacks %s; not used", name, " ".join(flags))
        return None
    return lib


Signature = tuple[type | None, int, int]
"""``(restype, pointer arguments, int arguments)`` of a kernel: ``void_p`` pointers first, then C ints."""


def load_variant(prefix: str, variants: dict[str, tuple[str, tuple[str, ...]]],
                 signatures: dict[str, Signature]) -> ctypes.CDLL | None:
    """The first of ``variants`` (``{isa: (source, flags)}``, best first) that builds and runs here, with the
    ``signatures`` of its functions set and ``lowbit_isa`` naming the variant; ``LOWBIT_CPU_ISA=<isa>`` forces one
    (tests; an unknown name is an error listing the valid ones). None when no variant runs here."""
    forced = os.environ.get("LOWBIT_CPU_ISA")
    if forced is not None and forced not in variants:
        raise ValueError(f"LOWBIT_CPU_ISA={forced!r} unknown; valid choices: {sorted(variants)}")
    for name in [forced] if forced else list(variants):
        source, flags = variants[name]
        lib = load(f"{prefix}_{name}", source, flags)
        if lib is None:
            continue
        for fn, (restype, n_ptr, n_int) in signatures.items():
            f = getattr(lib, fn)
            f.restype = restype
            f.argtypes = [ctypes.c_void_p] * n_ptr + [ctypes.c_int] * n_int
        lib.lowbit_isa = name
        return lib
    return None
