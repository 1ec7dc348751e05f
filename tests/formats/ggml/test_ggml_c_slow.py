"""Slow: build libggml-base from the ggml source (ggml-org/ggml, fetched; or ``$LOWBIT_GGML_SRC``) into a temp
dir and compare lowbit's bytes with ``ggml_quantize_chunk`` on fresh random data, and regenerate the committed
fixture. Skips when no compiler/cmake or no source tree is available."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lowbit.formats.ggml import GGML_TYPES, quantize_raw  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    from ggml_c import GGMLLib, build_libggml

    try:
        path = build_libggml(tmp_path_factory.mktemp("ggml-build"))
    except Exception as e:  # pragma: no cover
        pytest.skip(f"could not build libggml-base: {e}")
    if path is None:
        pytest.skip("no cmake/compiler or no ggml source (set LOWBIT_GGML_SRC or fetch ggml-org/ggml)")
    return GGMLLib(path)


@pytest.mark.parametrize("name", [n for n, t in GGML_TYPES.items()])
def test_random_rows_byte_exact_with_libggml(lib, name):
    from test_ggml_bytes import first_difference

    t = GGML_TYPES[name]
    rng = np.random.default_rng(1234)
    cols = 1536 if t.block_size == 256 else 576
    xs = [rng.standard_normal((48, cols)), rng.standard_t(3.0, (48, cols)) * 0.02,
          np.abs(rng.standard_normal((48, cols))), rng.integers(-8, 9, (48, cols)) / 8.0]
    qw = (rng.random(cols) ** 2 * 5).astype(np.float32)
    for x in xs:
        x = x.astype(np.float32)
        for im in ([None, qw] if t.uses_imatrix else [None]):
            ours = quantize_raw(torch.from_numpy(x), name, imatrix=im)
            theirs = lib.quantize(x, t.type_id, im)
            msg = first_difference(ours, theirs, t.type_size)
            assert not msg, f"{name} imatrix={im is not None}: {msg}"


def test_committed_fixture_is_what_libggml_produces(lib):
    from make_fixtures import FIXTURE, make

    fresh = make(str(lib.lib._name))
    with np.load(FIXTURE) as old:
        assert sorted(old.files) == sorted(fresh)
        for k in old.files:
            assert np.array_equal(old[k], fresh[k]), k
