"""A strict GGUF v3 writer: explicitly typed metadata, tensors streamed in info order, atomic output.

Layout (ggml ``docs/gguf.md``, and what ``gguf.cpp`` enforces — see the project's reference notes): header,
key/values, tensor infos, zero padding to the alignment, then each tensor's bytes padded to the alignment,
in info order, first at offset 0. Every value carries its GGUF type; llama.cpp rejects a key whose stored type
differs from the C type it asks for (``UINT32`` counts, ``FLOAT32`` epsilons...), so nothing is inferred.

Tensor data may be given lazily (a callable returning the bytes) so a model is quantized tensor by tensor while
the file is written, without holding the whole quantized model in memory.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from lowbit.formats.ggml import ggml_type
from lowbit.io.atomic import atomic_file

__all__ = ["GGUFWriter", "GGUFValueType"]

logger = logging.getLogger(__name__)

MAGIC = b"GGUF"
VERSION = 3
MAX_NAME = 63  # GGML_MAX_NAME - 1


class GGUFValueType:
    UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)


_SCALAR = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
           GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
           GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
           GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}
_NP = {GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
       GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
       GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "<u1", GGUFValueType.UINT64: "<u8",
       GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8"}


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]       # numpy order; ne = reversed
    type_id: int
    nbytes: int
    data: np.ndarray | Callable[[], np.ndarray]


class GGUFWriter:
    """Collect metadata and tensors, then :meth:`write` a GGUF v3 file atomically.

    Args:
        alignment: data alignment (power of two); written as ``general.alignment`` only if not 32.
    """

    def __init__(self, alignment: int = 32) -> None:
        if alignment < 1 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        self.alignment = alignment
        self._kv: dict[str, bytes] = {}
        self._tensors: dict[str, _Tensor] = {}
        if alignment != 32:
            self.add("general.alignment", alignment, GGUFValueType.UINT32)

    # ------------------------------------------------------------------------------------------ metadata
    def add(self, key: str, value: Any, vtype: int) -> None:
        """Add a scalar or string ``value`` stored as GGUF type ``vtype``."""
        if not key:
            raise ValueError("GGUF keys must be non-empty")
        if key in self._kv:
            raise ValueError(f"duplicate GGUF key {key!r}")
        self._kv[key] = _string(key) + struct.pack("<i", vtype) + self._value(value, vtype, key)

    def add_array(self, key: str, values: Sequence[Any] | np.ndarray, elem_type: int) -> None:
        """Add an array of ``elem_type`` (no nested arrays: gguf.cpp rejects them)."""
        if elem_type == GGUFValueType.ARRAY:
            raise ValueError(f"{key}: nested arrays are rejected by llama.cpp")
        if key in self._kv:
            raise ValueError(f"duplicate GGUF key {key!r}")
        n = len(values)
        if elem_type == GGUFValueType.STRING:
            body = b"".join(_string(str(v)) for v in values)
        else:
            arr = np.asarray(values)
            if elem_type != GGUFValueType.BOOL and arr.size and not np.all(np.isfinite(arr.astype(np.float64))):
                raise ValueError(f"{key}: non-finite value in array")
            body = np.ascontiguousarray(arr.astype(_NP[elem_type])).tobytes()
        self._kv[key] = (_string(key) + struct.pack("<i", GGUFValueType.ARRAY) + struct.pack("<i", elem_type)
                         + struct.pack("<Q", n) + body)

    def _value(self, value: Any, vtype: int, key: str) -> bytes:
        if vtype == GGUFValueType.STRING:
            if not isinstance(value, str):
                raise TypeError(f"{key}: expected a str, got {type(value).__name__}")
            return _string(value)
        if vtype == GGUFValueType.ARRAY:
            raise ValueError(f"{key}: use add_array for arrays")
        if vtype not in _SCALAR:
            raise ValueError(f"{key}: unknown GGUF value type {vtype}; valid: 0..12")
        try:
            return struct.pack(_SCALAR[vtype], value)
        except struct.error as e:
            raise ValueError(f"{key}: {value!r} does not fit GGUF type {vtype}: {e}") from None

    def add_u32(self, key: str, v: int) -> None:
        self.add(key, int(v), GGUFValueType.UINT32)

    def add_i32(self, key: str, v: int) -> None:
        self.add(key, int(v), GGUFValueType.INT32)

    def add_f32(self, key: str, v: float) -> None:
        self.add(key, float(v), GGUFValueType.FLOAT32)

    def add_bool(self, key: str, v: bool) -> None:
        self.add(key, bool(v), GGUFValueType.BOOL)

    def add_str(self, key: str, v: str) -> None:
        self.add(key, v, GGUFValueType.STRING)

    # ------------------------------------------------------------------------------------------ tensors
    def add_tensor(self, name: str, shape: Sequence[int], type_name: str | int,
                   data: np.ndarray | Callable[[], np.ndarray]) -> None:
        """Add a tensor of numpy-order ``shape`` (last dim = ggml ``ne[0]``) stored as ``type_name``.

        Args:
            data: the stored bytes (uint8, exactly ``rows · row_bytes``), or a callable producing them at
                write time.
        """
        t = ggml_type(type_name)
        shape = tuple(int(s) for s in shape)
        if not name or len(name.encode()) > MAX_NAME:
            raise ValueError(f"tensor name {name!r} must be 1..{MAX_NAME} bytes (GGML_MAX_NAME)")
        if name in self._tensors:
            raise ValueError(f"duplicate tensor name {name!r}")
        if not 1 <= len(shape) <= 4 or any(s < 1 for s in shape):
            raise ValueError(f"tensor {name}: shape {shape} must have 1..4 positive dimensions")
        if shape[-1] % t.block_size:
            raise ValueError(f"tensor {name}: row length {shape[-1]} is not a multiple of {t.name}'s block size "
                             f"{t.block_size}")
        nbytes = math.prod(shape) // t.block_size * t.type_size
        if isinstance(data, np.ndarray) and data.nbytes != nbytes:
            raise ValueError(f"tensor {name}: {t.name} {shape} needs {nbytes} bytes, got {data.nbytes}")
        self._tensors[name] = _Tensor(name, shape, t.type_id, nbytes, data)

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    # ------------------------------------------------------------------------------------------ output
    def _pad(self, n: int) -> int:
        return (-n) % self.alignment

    def header_bytes(self) -> bytes:
        out = [MAGIC, struct.pack("<I", VERSION), struct.pack("<Q", len(self._tensors)),
               struct.pack("<Q", len(self._kv))]
        out += list(self._kv.values())
        offset = 0
        for t in self._tensors.values():
            out.append(_string(t.name) + struct.pack("<I", len(t.shape)))
            out.append(b"".join(struct.pack("<Q", d) for d in reversed(t.shape)))
            out.append(struct.pack("<i", t.type_id) + struct.pack("<Q", offset))
            offset += t.nbytes + self._pad(t.nbytes)
        head = b"".join(out)
        return head + b"\0" * self._pad(len(head))

    def write(self, path: str | os.PathLike[str], overwrite: bool = True,
              progress: Callable[[int, int, str], None] | None = None) -> None:
        """Write the file atomically (temp file beside ``path``, then ``os.replace``).

        Args:
            progress: called as ``progress(done, total, tensor_name)`` after each tensor.
        """
        total = len(self._tensors)
        with atomic_file(path, overwrite=overwrite) as f:
            f.write(self.header_bytes())  # type: ignore[attr-defined]
            for i, t in enumerate(self._tensors.values()):
                data = t.data() if callable(t.data) else t.data
                buf = np.ascontiguousarray(data).view(np.uint8)
                if buf.nbytes != t.nbytes:
                    raise ValueError(f"tensor {t.name}: produced {buf.nbytes} bytes, expected {t.nbytes}")
                f.write(buf.tobytes())  # type: ignore[attr-defined]
                f.write(b"\0" * self._pad(t.nbytes))  # type: ignore[attr-defined]
                if progress is not None:
                    progress(i + 1, total, t.name)
        logger.info("wrote %s: %d tensors, %d metadata keys", os.fspath(path), total, len(self._kv))
