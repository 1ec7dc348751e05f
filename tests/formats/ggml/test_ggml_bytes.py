"""GGML block types: byte-exact with llama.cpp's reference quantizer and gguf-py, dequantize equal to gguf-py.

The committed fixture (see tests/fixtures/ggml/README.md) carries libggml's bytes, so this runs without a
compiler. A mismatch reports the first differing block with both byte strings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.formats.ggml import GGML_TYPES, dequantize_raw, quantize_raw

gguf = pytest.importorskip("gguf")
import gguf.quants as gq  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "ggml" / "reference_bytes.npz"
QUANT_TYPES = [n for n, t in GGML_TYPES.items() if t.block_size > 1]


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


def first_difference(ours: np.ndarray, theirs: np.ndarray, type_size: int) -> str:
    a = ours.reshape(-1, type_size)
    b = theirs.reshape(-1, type_size)
    diff = np.nonzero((a != b).any(axis=1))[0]
    if diff.size == 0:
        return ""
    i = int(diff[0])
    return (f"{diff.size}/{a.shape[0]} blocks differ; first is block {i}:\n ours   {a[i].tobytes().hex()}\n"
            f" theirs {b[i].tobytes().hex()}")


def _dists(ref: dict[str, np.ndarray]) -> list[str]:
    return sorted(k.split("/", 1)[1] for k in ref if k.startswith("input/"))


@pytest.mark.parametrize("name", QUANT_TYPES)
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_bytes_equal_libggml_reference(ref, name, with_imatrix):
    t = GGML_TYPES[name]
    if with_imatrix and not t.uses_imatrix:
        pytest.skip(f"{name} ignores the importance matrix")
    qw = ref["imatrix"] if with_imatrix else None
    for dist in _dists(ref):
        x = ref[f"input/{dist}"]
        expected = ref[f"{name}/{dist}/{'imatrix' if with_imatrix else 'plain'}"]
        ours = quantize_raw(torch.from_numpy(x), name, imatrix=qw)
        assert ours.shape == expected.shape
        msg = first_difference(ours, expected, t.type_size)
        assert not msg, f"{name} {dist}: {msg}"


def test_imatrix_changes_the_bytes(ref):
    """The fixture's imatrix bytes differ from the plain ones for every type that uses it (else the
    imatrix test above would not test anything)."""
    for name in QUANT_TYPES:
        if GGML_TYPES[name].uses_imatrix:
            assert not np.array_equal(ref[f"{name}/gauss/plain"], ref[f"{name}/gauss/imatrix"]), name


GGUF_QUANTIZES = []
for _n in GGML_TYPES:
    try:
        gq.quantize(np.zeros((1, 256), dtype=np.float32), getattr(gguf.GGMLQuantizationType, _n))
        GGUF_QUANTIZES.append(_n)
    except NotImplementedError:
        pass


@pytest.mark.parametrize("name", GGUF_QUANTIZES)
def test_bytes_equal_gguf_py(ref, name):
    t = GGML_TYPES[name]
    qt = getattr(gguf.GGMLQuantizationType, name)
    rng = np.random.default_rng(3)
    inputs = [ref[f"input/{d}"] for d in _dists(ref)] + [rng.standard_normal((16, 768)).astype(np.float32) * 0.02]
    for x in inputs:
        ours = quantize_raw(torch.from_numpy(x), name)
        theirs = np.asarray(gq.quantize(x, qt)).view(np.uint8).reshape(ours.shape)
        msg = first_difference(ours, theirs, t.type_size)
        assert not msg, f"{name}: {msg}"


def test_gguf_py_covers_the_promised_types():
    assert {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "F16", "F32", "BF16"} <= set(GGUF_QUANTIZES)


@pytest.mark.parametrize("name", list(GGML_TYPES))
def test_dequantize_equals_gguf_py(ref, name):
    t = GGML_TYPES[name]
    qt = getattr(gguf.GGMLQuantizationType, name)
    rng = np.random.default_rng(5)
    blobs = []
    if t.block_size > 1:
        blobs += [ref[f"{name}/{d}/plain"] for d in _dists(ref)]
        # arbitrary bytes decode too (every bit pattern is a valid block), except NaN/Inf f16 scales
        junk = rng.integers(0, 256, (3, 512 // t.block_size * t.type_size), dtype=np.uint8)
        blobs.append(junk)
    else:
        blobs.append(quantize_raw(torch.from_numpy(ref["input/gauss"]), name))
    for raw in blobs:
        cols = raw.shape[1] // t.type_size * t.block_size
        ours = dequantize_raw(raw, name, (raw.shape[0], cols)).numpy()
        theirs = gq.dequantize(raw, qt)
        np.testing.assert_array_equal(ours, theirs, err_msg=name)


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_round_trip_error_is_small(ref, name):
    """Quantize → dequantize keeps a gaussian within the type's expected RMS error (loose bound: bits)."""
    x = ref["input/gauss"]
    y = dequantize_raw(quantize_raw(torch.from_numpy(x), name), name, x.shape).numpy()
    bits = GGML_TYPES[name].bits_per_weight
    rms = float(np.sqrt(np.mean((y - x) ** 2)))
    bound = 1.0 if name.startswith("TQ") else 4.0 * 2.0 ** (-bits + 1.5)
    assert rms < bound, (name, rms, bound)


def test_dequantize_raw_rejects_bad_input():
    raw = np.zeros(18 * 4, dtype=np.uint8)
    with pytest.raises(ValueError, match="Q9_9"):
        dequantize_raw(raw, "Q9_9", (4, 32))
    with pytest.raises(ValueError, match="needs 72 bytes"):
        dequantize_raw(raw[:-1], "Q4_0", (4, 32))
    with pytest.raises(ValueError, match="multiple"):
        dequantize_raw(raw, "Q4_0", (8, 16))
    assert dequantize_raw(raw, "q4_0", (4, 32)).shape == (4, 32)
    assert dequantize_raw(raw, 2, (4, 32)).dtype == torch.float32


def test_quantize_raw_rejects_bad_input():
    x = torch.randn(4, 576)
    with pytest.raises(ValueError, match=r"multiple of 256.*Types that fit: .*Q8_0"):
        quantize_raw(x, "Q4_K")
    with pytest.raises(ValueError, match="valid choices"):
        quantize_raw(x, "Q4_Z")
    with pytest.raises(ValueError, match="2-D"):
        quantize_raw(torch.randn(512), "Q8_0")
    bad = torch.randn(2, 256)
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_raw(bad, "Q4_K")
    with pytest.raises(ValueError, match="importance matrix has 10 values"):
        quantize_raw(torch.randn(2, 256), "Q4_K", imatrix=np.ones(10))
    with pytest.raises(ValueError, match="non-negative"):
        quantize_raw(torch.randn(2, 256), "Q4_K", imatrix=-np.ones(256))
