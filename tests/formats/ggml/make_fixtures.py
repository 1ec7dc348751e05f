"""Produce ``tests/fixtures/ggml/reference_bytes.npz``: seeded inputs and the bytes libggml's
``ggml_quantize_chunk`` makes of them, for every lowbit GGML type, with and without an importance matrix.

Usage: ``python tests/formats/ggml/make_fixtures.py [path/to/libggml-base.so]`` (builds one from the fetched
ggml source when no path is given). The slow test ``test_ggml_c_slow.py`` regenerates and compares.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
FIXTURE = HERE.parents[1] / "fixtures" / "ggml" / "reference_bytes.npz"


def fixture_inputs(rows: int = 4, cols: int = 512, seed: int = 20261125) -> dict[str, np.ndarray]:
    """Distributions that exercise the searches: gaussian, heavy tails, one-signed, zero blocks, exact ties."""
    rng = np.random.default_rng(seed)
    zero = rng.standard_normal((rows, cols))
    zero[:, :256] = 0
    zero[1, 256:288] = 0
    tiny = rng.standard_normal((rows, cols)) * 1e-6
    return {
        "gauss": rng.standard_normal((rows, cols)),
        "student_t": rng.standard_t(2.0, (rows, cols)),
        "positive": np.abs(rng.standard_normal((rows, cols))) + 0.1,
        "zero_blocks": zero,
        "grid_ties": rng.integers(-16, 17, (rows, cols)) / 4.0,
        "tiny": tiny,
    }


def fixture_imatrix(cols: int = 512, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(cols) ** 3 * 4 + 1e-3).astype(np.float32)


def make(lib_path: str | None = None) -> dict[str, np.ndarray]:
    from ggml_c import GGMLLib, build_libggml

    from lowbit.formats.ggml import GGML_TYPES

    path = lib_path or build_libggml()
    if path is None:
        raise RuntimeError("no libggml-base available (need cmake, a C compiler and the ggml source)")
    lib = GGMLLib(Path(path))
    data: dict[str, np.ndarray] = {}
    qw = fixture_imatrix()
    data["imatrix"] = qw
    for dist, x in fixture_inputs().items():
        x = x.astype(np.float32)
        data[f"input/{dist}"] = x
        for name, t in GGML_TYPES.items():
            if t.block_size == 1:  # float types: checked against gguf-py instead
                continue
            data[f"{name}/{dist}/plain"] = lib.quantize(x, t.type_id, None)
            if t.uses_imatrix:
                data[f"{name}/{dist}/imatrix"] = lib.quantize(x, t.type_id, qw)
    return data


if __name__ == "__main__":
    d = make(sys.argv[1] if len(sys.argv) > 1 else None)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(FIXTURE, **d)
    print(f"wrote {len(d)} arrays to {FIXTURE}")
