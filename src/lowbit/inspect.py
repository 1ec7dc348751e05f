"""What is inside a lowbit checkpoint or a GGUF file: tensors, formats, bits per weight.

Reads headers only (safetensors header, GGUF tensor infos); no tensor data is decoded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["inspect_path"]

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def inspect_path(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe ``path`` (a checkpoint directory or a ``.gguf`` file) as a JSON-ready dict."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    from lowbit.io import checkpoint

    if p.is_dir():
        if checkpoint.is_checkpoint(p):
            return _inspect_checkpoint(p)
        raise ValueError(f"{p} is a directory without lowbit.json; inspect takes a lowbit checkpoint or a GGUF file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _inspect_gguf(p)
    raise ValueError(f"{p} is neither a lowbit checkpoint directory nor a GGUF file (magic {magic!r})")


def _safetensors_header(path: Path) -> dict[str, Any]:
    import json
    import struct

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(100 << 20, path.stat().st_size):
            raise ValueError(f"{path} declares a {n}-byte header; the file is corrupt")
        hdr = json.loads(f.read(n))
    hdr.pop("__metadata__", None)
    return hdr


def _inspect_checkpoint(p: Path) -> dict[str, Any]:
    from lowbit.io.checkpoint import WEIGHTS, read_manifest

    manifest = read_manifest(p, verify=False)
    hdr = _safetensors_header(p / WEIGHTS)

    def nbytes(key: str) -> int:
        info = hdr[key]
        start, end = info["data_offsets"]
        return int(end) - int(start)

    tensors = []
    q_bytes = q_numel = 0
    layer_names = set(manifest["layers"])
    for name, info in sorted(manifest["layers"].items()):
        keys = [k for k in hdr if k.rsplit(".", 1)[0] == name and not k.endswith(".bias")]
        b = sum(nbytes(k) for k in keys)
        numel = int(info["shape"][0]) * int(info["shape"][1])
        q_bytes += b
        q_numel += numel
        tensors.append({"name": name, "shape": info["shape"], "format": info["format"]["kind"],
                        "format_config": info["format"], "bytes": b, "bits_per_weight": 8.0 * b / numel})
    other_bytes = 0
    for k, info in sorted(hdr.items()):
        if k.rsplit(".", 1)[0] in layer_names and not k.endswith(".bias"):
            continue
        numel = 1
        for s in info["shape"]:
            numel *= int(s)
        b = nbytes(k)
        other_bytes += b
        tensors.append({"name": k, "shape": info["shape"], "format": info["dtype"].lower(), "bytes": b,
                        "bits_per_weight": 8.0 * b / max(numel, 1)})
    summary = {"method": (manifest.get("method") or {}).get("kind"), "quantized_layers": len(layer_names),
               "quantized_bits_per_weight": round(8.0 * q_bytes / q_numel, 4) if q_numel else None,
               "quantized_bytes": q_bytes, "other_bytes": other_bytes, "total_bytes": q_bytes + other_bytes}
    return {"kind": "lowbit-checkpoint", "path": str(p), "summary": summary, "tensors": tensors,
            "extra": manifest.get("extra", {})}


def _inspect_gguf(p: Path) -> dict[str, Any]:
    from lowbit.io.gguf_reader import read_gguf

    g = read_gguf(p)
    try:
        tensors = []
        total_bytes = total_numel = 0
        for name, t in g.tensors.items():
            total_bytes += t.nbytes
            total_numel += t.n_elements
            tensors.append({"name": name, "shape": list(t.shape), "format": t.ggml_type.name, "bytes": t.nbytes,
                            "bits_per_weight": 8.0 * t.nbytes / max(t.n_elements, 1)})
        md = g.metadata
        summary = {"architecture": md.get("general.architecture"), "name": md.get("general.name"),
                   "file_type": md.get("general.file_type"), "version": g.version, "tensors": len(tensors),
                   "bits_per_weight": round(8.0 * total_bytes / max(total_numel, 1), 4), "tensor_bytes": total_bytes}
        return {"kind": "gguf", "path": str(p), "summary": summary, "tensors": tensors}
    finally:
        g.close()
