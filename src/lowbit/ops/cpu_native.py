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

logger = logging.getLogger(__name__)

__all__ = ["load", "cache_dir"]


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
