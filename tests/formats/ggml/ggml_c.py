"""ctypes bridge to a libggml-base built from llama.cpp/ggml source (used by the slow tests and the fixture tool).

Nothing here is imported by the default test run unless a library path is known: the library is built by
:func:`build_libggml` from a ggml source tree (``LOWBIT_GGML_SRC`` or a fetched mirror) into a temp dir.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

MIRROR = Path("/work/.mirror/ggml-org+ggml/repo")


def ggml_source() -> Path | None:
    """A ggml source tree: ``$LOWBIT_GGML_SRC`` (a checkout of ggml-org/ggml or llama.cpp's ``ggml/``) or the
    fetched ggml-org/ggml mirror (a bare git dir, exported with ``git archive``)."""
    env = os.environ.get("LOWBIT_GGML_SRC")
    if env and (Path(env) / "src" / "ggml-quants.c").exists():
        return Path(env)
    if (MIRROR / "HEAD").exists() or (MIRROR / ".git").exists():
        out = Path(tempfile.mkdtemp(prefix="lowbit-ggml-src-"))
        subprocess.run(f"git --git-dir={MIRROR} archive HEAD | tar -x -C {out}", shell=True, check=True)
        return out
    return None


def build_libggml(build_dir: Path | None = None) -> Path | None:
    """Build ``libggml-base.so`` (quantizers only need ggml-base) with cmake; returns its path or None."""
    if shutil.which("cmake") is None or shutil.which("cc") is None:
        return None
    cached = os.environ.get("LOWBIT_LIBGGML")
    if cached and Path(cached).exists():
        return Path(cached)
    src = ggml_source()
    if src is None:
        return None
    build = build_dir or Path(tempfile.mkdtemp(prefix="lowbit-ggml-build-"))
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF",
                    "-DGGML_BUILD_TESTS=OFF", "-DGGML_BUILD_EXAMPLES=OFF"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "ggml-base", "-j2"], check=True, capture_output=True)
    libs = sorted(build.rglob("libggml-base.so*"))
    return libs[0] if libs else None


class GGMLLib:
    """``ggml_quantize_chunk`` / ``ggml_get_type_traits`` of a built libggml-base."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                 ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self.lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        self.lib.ggml_row_size.restype = ctypes.c_size_t
        self.lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]

    def quantize(self, x: np.ndarray, type_id: int, imatrix: np.ndarray | None = None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        self.lib.ggml_quantize_init(type_id)
        row_bytes = self.lib.ggml_row_size(type_id, cols)
        out = np.zeros((rows, row_bytes), dtype=np.uint8)
        qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        self.lib.ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, 0, rows, cols,
                                     None if qw is None else qw.ctypes.data)
        return out
