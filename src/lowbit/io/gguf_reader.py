"""Our own GGUF (v2/v3) parser: header, typed metadata, tensor infos, memory-mapped tensor data.

File layout (ggml ``docs/gguf.md``; rules as enforced by ggml's ``gguf.cpp``)::

    char[4] magic "GGUF" | uint32 version | uint64 n_tensors | uint64 n_kv
    n_kv x (string key, int32 value_type, value)
    n_tensors x (string name, uint32 n_dims, uint64 ne[n_dims], int32 ggml_type, uint64 offset)
    zero padding to ``general.alignment`` (default 32)
    DATA: tensor blobs at DATA + offset

``ne[0]`` is the contiguous dimension, so the numpy/PyTorch shape of a tensor is ``reversed(ne)``.

Every malformed input (bad magic, unsupported version, truncated file, counts or lengths larger than what
is left of the file, unknown value or tensor types, duplicate keys or tensor names, tensor data past the end
of the file, ...) raises a :class:`ValueError` that names the problem. Lengths are checked against the bytes
remaining *before* anything is allocated, so a corrupt count can neither hang the parser nor exhaust memory.

Tensor data is never copied at open time: :meth:`GGUFFile.raw` returns a read-only ``numpy.uint8`` view of the
memory-mapped file, and :meth:`GGUFFile.tensor` dequantizes one tensor to ``torch.float32``.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["GGML_TYPES", "GGMLType", "GGUFFile", "GGUFTensorInfo", "GGUFValueType", "read_gguf",
           "dequantize_raw"]

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_NAME_LENGTH = 63  # GGML_MAX_NAME = 64 including the NUL terminator


class GGUFValueType:
    """Metadata value type ids (``enum gguf_type``)."""

    UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
    NAMES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY",
             "UINT64", "INT64", "FLOAT64")


# value type id -> (struct code, size in bytes) for fixed-size scalars
_SCALAR_CODES: dict[int, tuple[str, int]] = {
    GGUFValueType.UINT8: ("B", 1), GGUFValueType.INT8: ("b", 1), GGUFValueType.UINT16: ("H", 2),
    GGUFValueType.INT16: ("h", 2), GGUFValueType.UINT32: ("I", 4), GGUFValueType.INT32: ("i", 4),
    GGUFValueType.FLOAT32: ("f", 4), GGUFValueType.BOOL: ("?", 1), GGUFValueType.UINT64: ("Q", 8),
    GGUFValueType.INT64: ("q", 8), GGUFValueType.FLOAT64: ("d", 8),
}
_NUMPY_CODES: dict[int, str] = {
    GGUFValueType.UINT8: "u1", GGUFValueType.INT8: "i1", GGUFValueType.UINT16: "u2", GGUFValueType.INT16: "i2",
    GGUFValueType.UINT32: "u4", GGUFValueType.INT32: "i4", GGUFValueType.FLOAT32: "f4", GGUFValueType.BOOL: "u1",
    GGUFValueType.UINT64: "u8", GGUFValueType.INT64: "i8", GGUFValueType.FLOAT64: "f8",
}


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type: ``block_size`` elements are stored in ``type_size`` bytes."""

    id: int
    name: str
    block_size: int
    type_size: int


# ggml ``include/ggml.h`` ids and ``ggml.c`` type traits. Ids 4, 5, 31-33, 36-38 were removed upstream.
# Q8_1 is 36 bytes in ggml-common.h (gguf-py lists 40); it never appears in files.
GGML_TYPES: dict[int, GGMLType] = {t.id: t for t in (
    GGMLType(0, "F32", 1, 4), GGMLType(1, "F16", 1, 2), GGMLType(2, "Q4_0", 32, 18), GGMLType(3, "Q4_1", 32, 20),
    GGMLType(6, "Q5_0", 32, 22), GGMLType(7, "Q5_1", 32, 24), GGMLType(8, "Q8_0", 32, 34),
    GGMLType(9, "Q8_1", 32, 36), GGMLType(10, "Q2_K", 256, 84), GGMLType(11, "Q3_K", 256, 110),
    GGMLType(12, "Q4_K", 256, 144), GGMLType(13, "Q5_K", 256, 176), GGMLType(14, "Q6_K", 256, 210),
    GGMLType(15, "Q8_K", 256, 292), GGMLType(16, "IQ2_XXS", 256, 66), GGMLType(17, "IQ2_XS", 256, 74),
    GGMLType(18, "IQ3_XXS", 256, 98), GGMLType(19, "IQ1_S", 256, 50), GGMLType(20, "IQ4_NL", 32, 18),
    GGMLType(21, "IQ3_S", 256, 110), GGMLType(22, "IQ2_S", 256, 82), GGMLType(23, "IQ4_XS", 256, 136),
    GGMLType(24, "I8", 1, 1), GGMLType(25, "I16", 1, 2), GGMLType(26, "I32", 1, 4), GGMLType(27, "I64", 1, 8),
    GGMLType(28, "F64", 1, 8), GGMLType(29, "IQ1_M", 256, 56), GGMLType(30, "BF16", 1, 2),
    GGMLType(34, "TQ1_0", 256, 54), GGMLType(35, "TQ2_0", 256, 66), GGMLType(39, "MXFP4", 32, 17),
)}

# plain (non-block) types: numpy dtype of one element
_PLAIN_DTYPES: dict[str, str] = {"F32": "f4", "F16": "f2", "F64": "f8", "I8": "i1", "I16": "i2", "I32": "i4",
                                 "I64": "i8"}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor entry.

    Attributes:
        name: tensor name, e.g. ``blk.0.attn_q.weight``.
        shape: numpy/PyTorch shape (``reversed(ne)``), e.g. ``(out_features, in_features)``.
        ggml_type: the stored type.
        offset: byte offset of the data from the start of the file (absolute, not relative to DATA).
        nbytes: stored size in bytes.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    offset: int
    nbytes: int

    @property
    def ne(self) -> tuple[int, ...]:
        """ggml dimension order (``ne[0]`` contiguous)."""
        return tuple(reversed(self.shape))

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass
class GGUFFile:
    """A parsed GGUF file. Metadata is decoded eagerly; tensor data stays memory-mapped.

    Attributes:
        path: the file.
        version: 2 or 3.
        byte_order: ``"<"`` (little-endian) or ``">"`` (a big-endian file).
        alignment: data alignment in bytes.
        data_offset: absolute offset of the DATA section.
        metadata: key -> value (str, int, float, bool, or a list of those for arrays), in file order.
        metadata_types: key -> value type id, and for arrays ``(ARRAY, element type id)``.
        tensors: name -> :class:`GGUFTensorInfo`, in file order.
    """

    path: str
    version: int
    byte_order: str
    alignment: int
    data_offset: int
    metadata: dict[str, Any]
    metadata_types: dict[str, int | tuple[int, int]]
    tensors: dict[str, GGUFTensorInfo]
    _buffer: Any = field(repr=False, default=None)

    def raw(self, name: str) -> np.ndarray:
        """Stored bytes of tensor ``name`` as a read-only ``uint8`` array (a view of the mapped file)."""
        info = self._info(name)
        return np.frombuffer(self._buffer, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` dequantized to ``torch.float32`` with its numpy shape.

        Raises:
            ValueError: unknown name, or a type that cannot be dequantized.
        """
        info = self._info(name)
        raw = self.raw(name)
        if self.byte_order == ">":
            if info.ggml_type.name not in _PLAIN_DTYPES:
                raise ValueError(f"tensor {name!r}: big-endian {info.ggml_type.name} data is not supported; "
                                 f"big-endian files are readable only for {sorted(_PLAIN_DTYPES)}")
            arr = raw.view(">" + _PLAIN_DTYPES[info.ggml_type.name]).astype(np.float32)
            return torch.from_numpy(arr.reshape(info.shape))
        return dequantize_raw(raw, info.ggml_type.name, info.shape)

    def _info(self, name: str) -> GGUFTensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ValueError(f"no tensor named {name!r} in {self.path}; it has {len(self.tensors)} tensors, "
                             f"e.g. {list(self.tensors)[:5]}") from None

    def close(self) -> None:
        """Release the memory map (arrays returned by :meth:`raw` must not be used afterwards)."""
        if isinstance(self._buffer, mmap.mmap):
            try:
                self._buffer.close()
            except BufferError:  # views still alive: the map is freed when they go
                pass
        self._buffer = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dequantize_raw(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Dequantize stored bytes of one tensor to ``torch.float32`` of ``shape``.

    Plain types (F32/F16/BF16/F64/I*) are converted here; ggml block types go through
    :func:`_dequantize_blocks`.

    Args:
        raw: ``uint8`` bytes, little-endian, exactly the stored size.
        type_name: ggml type name (``"Q4_1"``).
        shape: numpy shape, last dimension contiguous.
    """
    if type_name in _PLAIN_DTYPES:
        arr = raw.view("<" + _PLAIN_DTYPES[type_name]).astype(np.float32)
        return torch.from_numpy(arr.reshape(shape))
    if type_name == "BF16":
        bits = raw.view("<u2").astype(np.uint32) << 16
        return torch.from_numpy(bits.view(np.float32).reshape(shape))
    return _dequantize_blocks(raw, type_name, shape)


def _dequantize_blocks(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """THE ONE SWITCH POINT for ggml block types: our byte-exact GGML formats (:mod:`lowbit.formats.ggml`)."""
    from lowbit.formats.ggml import dequantize_raw as ggml_dequantize_raw

    return ggml_dequantize_raw(raw, type_name, tuple(shape))


class _Cursor:
    """Bounds-checked reader over a bytes-like buffer."""

    def __init__(self, buf: Any, size: int, byte_order: str) -> None:
        self.buf, self.size, self.bo, self.pos = buf, size, byte_order, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ValueError(f"truncated GGUF file: {what} needs {n} bytes at offset {self.pos}, "
                             f"only {self.size - self.pos} remain")

    def scalar(self, vtype: int, what: str) -> Any:
        code, n = _SCALAR_CODES[vtype]
        self.need(n, what)
        (v,) = struct.unpack_from(self.bo + code, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def i32(self, what: str) -> int:
        return self.scalar(GGUFValueType.INT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        data = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{what} at offset {self.pos - n} is not valid UTF-8: {exc}") from None


def _value_type(cur: _Cursor, key: str, array_element: bool = False) -> int:
    vtype = cur.i32(f"value type of {key!r}")
    if not 0 <= vtype <= 12:
        raise ValueError(f"metadata key {key!r} has invalid value type {vtype}; valid types are 0..12 "
                         f"({', '.join(GGUFValueType.NAMES)})")
    if array_element and vtype == GGUFValueType.ARRAY:
        raise ValueError(f"metadata key {key!r} is a nested array, which GGUF readers (gguf.cpp) reject")
    return vtype


def _read_value(cur: _Cursor, key: str) -> tuple[Any, int | tuple[int, int]]:
    vtype = _value_type(cur, key)
    if vtype == GGUFValueType.STRING:
        return cur.string(f"value of {key!r}"), vtype
    if vtype != GGUFValueType.ARRAY:
        return cur.scalar(vtype, f"value of {key!r}"), vtype
    etype = _value_type(cur, key, array_element=True)
    count = cur.u64(f"element count of {key!r}")
    min_size = 8 if etype == GGUFValueType.STRING else _SCALAR_CODES[etype][1]
    if count * min_size > cur.size - cur.pos:
        raise ValueError(f"metadata array {key!r} claims {count} elements of type {GGUFValueType.NAMES[etype]}, "
                         f"more than the {cur.size - cur.pos} bytes left in the file can hold")
    if etype == GGUFValueType.STRING:
        values: list[Any] = [cur.string(f"element {i} of {key!r}") for i in range(count)]
    else:
        n = count * min_size
        arr = np.frombuffer(bytes(cur.buf[cur.pos:cur.pos + n]), dtype=cur.bo + _NUMPY_CODES[etype])
        cur.pos += n
        values = arr.astype(bool).tolist() if etype == GGUFValueType.BOOL else arr.tolist()
    return values, (vtype, etype)


def _header(buf: Any, size: int) -> tuple[str, int]:
    if size < 24:
        raise ValueError(f"truncated GGUF file: {size} bytes, a header needs 24")
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        raise ValueError(f"bad magic {magic!r}: not a GGUF file (expected {GGUF_MAGIC!r})")
    (version,) = struct.unpack_from("<I", buf, 4)
    if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
        return ">", version >> 24  # a whole-file big-endian GGUF
    if version not in SUPPORTED_VERSIONS:
        hint = " (GGUFv1 is no longer supported)" if version == 1 else ""
        raise ValueError(f"unsupported GGUF version {version}{hint}; supported versions: {SUPPORTED_VERSIONS}")
    return "<", version


def _parse(buf: Any, size: int, path: str) -> GGUFFile:
    byte_order, version = _header(buf, size)
    cur = _Cursor(buf, size, byte_order)
    cur.pos = 8
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    # a KV is at least 8 (key length) + 4 (type) + 1 bytes; a tensor info at least 8 + 4 + 8 + 4 + 8
    if n_kv * 13 > size - cur.pos:
        raise ValueError(f"metadata count {n_kv} is impossible for a file of {size} bytes")
    if n_tensors * 32 > size - cur.pos:
        raise ValueError(f"tensor count {n_tensors} is impossible for a file of {size} bytes")

    metadata: dict[str, Any] = {}
    types: dict[str, int | tuple[int, int]] = {}
    for i in range(n_kv):
        key = cur.string(f"key of metadata entry {i}")
        if not key:
            raise ValueError(f"metadata entry {i} has an empty key")
        if key in metadata:
            raise ValueError(f"duplicate metadata key {key!r}")
        metadata[key], types[key] = _read_value(cur, key)

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        if types["general.alignment"] != GGUFValueType.UINT32 or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment must be a UINT32 power of two, got {alignment!r} "
                             f"of type {types['general.alignment']}")

    entries: list[tuple[str, tuple[int, ...], GGMLType, int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}")
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        if len(name.encode()) > MAX_NAME_LENGTH:
            raise ValueError(f"tensor name {name[:80]!r} is {len(name.encode())} bytes long; "
                             f"GGUF allows at most {MAX_NAME_LENGTH}")
        seen.add(name)
        n_dims = cur.u32(f"n_dims of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions; valid: 1..{MAX_DIMS}")
        ne = [cur.scalar(GGUFValueType.INT64, f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
        if any(n < 0 for n in ne):
            raise ValueError(f"tensor {name!r} has a negative dimension: ne={ne}")
        type_id = cur.i32(f"type of tensor {name!r}")
        if type_id not in GGML_TYPES:
            raise ValueError(f"tensor {name!r} has unknown or removed ggml type id {type_id}; valid ids: "
                             f"{sorted(GGML_TYPES)}")
        gtype = GGML_TYPES[type_id]
        if ne[0] % gtype.block_size:
            raise ValueError(f"tensor {name!r}: row length ne[0]={ne[0]} is not a multiple of the "
                             f"{gtype.name} block size {gtype.block_size}")
        rel = cur.u64(f"offset of tensor {name!r}")
        if rel % alignment:
            raise ValueError(f"tensor {name!r} has offset {rel}, not a multiple of the alignment {alignment}")
        entries.append((name, tuple(reversed(ne)), gtype, rel))

    data_offset = cur.pos if n_tensors == 0 else -(-cur.pos // alignment) * alignment
    if data_offset > size:
        raise ValueError(f"truncated GGUF file: data section would start at {data_offset}, file has {size} bytes")
    tensors: dict[str, GGUFTensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, shape, gtype, rel in entries:
        n_el = 1
        for n in shape:
            n_el *= n
        if n_el > size * 64:  # no ggml type stores more than 64 elements per byte; also stops int64 overflow
            raise ValueError(f"tensor {name!r} of shape {shape} is impossibly large for a {size}-byte file")
        nbytes = n_el // gtype.block_size * gtype.type_size
        start = data_offset + rel
        if start + nbytes > size:
            raise ValueError(f"tensor {name!r} data [{start}, {start + nbytes}) lies past the end of the file "
                             f"({size} bytes): truncated file or bad offset")
        tensors[name] = GGUFTensorInfo(name, shape, gtype, start, nbytes)
        spans.append((start, start + nbytes, name))
    spans.sort()
    for (s0, e0, a), (s1, _, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(f"tensor data of {a!r} [{s0}, {e0}) overlaps tensor {b!r} starting at {s1}")
    return GGUFFile(path, version, byte_order, alignment, data_offset, metadata, types, tensors)


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse a GGUF file; tensor data stays memory-mapped.

    Args:
        path: the ``.gguf`` file.

    Returns:
        A :class:`GGUFFile`.

    Raises:
        ValueError: the file is not a valid GGUF v2/v3 file; the message names the problem.
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{path} is empty, not a GGUF file")
    with open(path, "rb") as fh:
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        parsed = _parse(buf, size, path)
    except BaseException:
        try:
            buf.close()
        except BufferError:  # a traceback frame still holds a view; the map is freed with it
            pass
        raise
    parsed._buffer = buf
    logger.debug("read %s: GGUF v%d, %d tensors, %d metadata keys", path, parsed.version, len(parsed.tensors),
                 len(parsed.metadata))
    return parsed
