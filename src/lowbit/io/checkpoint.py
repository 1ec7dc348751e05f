"""lowbit checkpoints: safetensors plus a versioned JSON quantization config. No pickle anywhere.

A checkpoint is a directory laid out like a transformers ``save_pretrained`` directory::

    config.json               the model's transformers config (when the model has one)
    tokenizer files           when a tokenizer is given
    model.safetensors         every tensor: QuantLinear stored tensors (qdata, scale, ...) and float params
                              (or, with ``max_shard_size`` / from streaming, ``model-0000k-of-0000N.safetensors``
                              shards plus ``model.safetensors.index.json``, as ``save_pretrained`` writes)
    lowbit.json               {"lowbit_checkpoint": VERSION, "method": {...}, "layers": {name: {format, shape,
                              dtype}}, "files": {name: {"sha256", "bytes"}}}

Loading checks the version, the file hashes (a flipped bit or a truncated file is caught before any tensor
is used), and that every tensor's shape agrees with the layer's format; any disagreement is a
``CheckpointError`` naming the file and the problem. The directory is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.formats.base import Format, QuantizedTensor
from lowbit.io.atomic import atomic_dir
from lowbit.io.hf import dtype_kwarg
from lowbit.methods.base import MethodConfig
from lowbit.model.walk import set_submodule
from lowbit.nn.linear import QuantLinear

__all__ = ["CHECKPOINT_VERSION", "CheckpointError", "save", "load", "read_manifest", "is_checkpoint"]

log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 1
MANIFEST = "lowbit.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated, from a newer lowbit, or inconsistent."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MANIFEST).is_file()


def save(model: nn.Module, path: str | os.PathLike[str], *, tokenizer: Any = None,
         method: MethodConfig | None = None, overwrite: bool = False, extra: dict[str, Any] | None = None,
         max_shard_size: int | None = None) -> Path:
    """Save a (quantized) model as a lowbit checkpoint directory at ``path``, atomically.

    Args:
        model: a module whose quantized layers are ``QuantLinear``; transformers models also save their config.
        path: output directory; must not exist unless ``overwrite``.
        tokenizer: optional tokenizer saved beside the weights.
        method: the method config that produced the model (recorded for reproducibility).
        extra: JSON-serializable notes stored in the manifest (e.g. the source model).
        max_shard_size: bytes per weights file; a larger model is written as ``save_pretrained`` does,
            ``model-0000k-of-0000N.safetensors`` plus ``model.safetensors.index.json``. None: one file.
    """
    if max_shard_size is not None and (not isinstance(max_shard_size, int) or max_shard_size < 1):
        raise ValueError(f"max_shard_size must be a positive number of bytes or None, got {max_shard_size!r}")
    layers: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            layers[name] = {"format": mod.format.to_dict(), "shape": [mod.out_features, mod.in_features],
                            "dtype": str(mod.compute_dtype).removeprefix("torch.")}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # Tied weights share storage; safetensors refuses shared tensors, so store each once.
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tied: dict[str, str] = {}
    for k in list(state):
        t = state[k]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            tied[k] = seen[key]
            del state[k]
        else:
            seen[key] = k
    with atomic_dir(path, overwrite=overwrite) as tmp:
        # One key only: safetensors writes metadata from a hash map, so several keys come out in a random
        # order and identical checkpoints would differ byte for byte. The version lives in lowbit.json.
        meta = {"format": "pt"}
        parts = _shards(state, max_shard_size) if max_shard_size is not None else [state]
        if len(parts) == 1:
            save_file(state, str(tmp / WEIGHTS), metadata=meta)
        else:
            weight_map = {}
            for i, part in enumerate(parts, 1):
                fname = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
                save_file(part, str(tmp / fname), metadata=meta)
                weight_map.update({k: fname for k in part})
            total = sum(v.numel() * v.element_size() for v in state.values())
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                 "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "to_json_file"):
            cfg.to_json_file(str(tmp / "config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"lowbit_checkpoint": CHECKPOINT_VERSION, "method": method.to_dict() if method else None,
                    "layers": layers, "tied": tied, "files": files, "extra": extra or {}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return Path(path)


def read_manifest(path: str | os.PathLike[str], verify: bool = True) -> dict[str, Any]:
    """Read and validate ``lowbit.json``; with ``verify``, check every recorded file's size and hash."""
    root = Path(path)
    mf = root / MANIFEST
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a lowbit checkpoint directory")
    if not mf.is_file():
        raise CheckpointError(f"{root} has no {MANIFEST}; not a lowbit checkpoint")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mf} is not valid JSON ({e}); the checkpoint is corrupt") from None
    if not isinstance(manifest, dict) or "lowbit_checkpoint" not in manifest:
        raise CheckpointError(f"{mf} lacks 'lowbit_checkpoint'; not a lowbit checkpoint manifest")
    version = manifest["lowbit_checkpoint"]
    if not isinstance(version, int) or not 1 <= version <= CHECKPOINT_VERSION:
        raise CheckpointError(f"{mf} has checkpoint version {version!r}; this lowbit reads 1..{CHECKPOINT_VERSION}"
                              " (upgrade lowbit)")
    known = {"lowbit_checkpoint", "method", "layers", "tied", "files", "extra"}
    unknown = sorted(set(manifest) - known)
    if unknown:
        raise CheckpointError(f"{mf} has unknown field(s) {unknown}; valid fields: {sorted(known)}")
    _check_structure(manifest, mf)
    if verify:
        for name, info in manifest.get("files", {}).items():
            p = root / name
            if not p.is_file():
                raise CheckpointError(f"{p} is missing from the checkpoint")
            size = p.stat().st_size
            if size != info.get("bytes"):
                raise CheckpointError(f"{p} has {size} bytes, the manifest records {info.get('bytes')}: "
                                      "truncated or modified")
            if _sha256(p) != info.get("sha256"):
                raise CheckpointError(f"{p} does not match its recorded sha256: the file is corrupt or modified")
    return manifest


_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _check_structure(m: dict[str, Any], mf: Path) -> None:
    """Every manifest field has the type and range lowbit writes; anything else is a ``CheckpointError``."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{mf}: {what}; the manifest is corrupt or was not written by lowbit")

    for key, typ in (("layers", dict), ("tied", dict), ("files", dict), ("extra", dict)):
        if key in m and not isinstance(m[key], typ):
            raise bad(f"'{key}' must be a JSON object, got {type(m[key]).__name__}")
    if "layers" not in m:
        raise bad("'layers' is missing")
    if m.get("method") is not None and not isinstance(m["method"], dict):
        raise bad("'method' must be an object or null")
    for name, info in m.get("files", {}).items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise bad(f"file name {name!r} is not a plain file name")
        if not (isinstance(info, dict) and isinstance(info.get("sha256"), str)
                and isinstance(info.get("bytes"), int) and not isinstance(info.get("bytes"), bool)):
            raise bad(f"files[{name!r}] must be {{'sha256': str, 'bytes': int}}")
    for name, info in m["layers"].items():
        if not isinstance(info, dict) or not isinstance(info.get("format"), dict):
            raise bad(f"layers[{name!r}] must be an object with a 'format' object")
        shape = info.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**31 for d in shape)):
            raise bad(f"layers[{name!r}].shape must be [out_features, in_features] positive integers, got {shape!r}")
        if info.get("dtype") not in _DTYPES:
            raise bad(f"layers[{name!r}].dtype {info.get('dtype')!r} is not one of {list(_DTYPES)}")
    for alias, target in m.get("tied", {}).items():
        if not isinstance(target, str):
            raise bad(f"tied[{alias!r}] must name a tensor, got {target!r}")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def read_weight_map(index: Path) -> dict[str, str]:
    """``weight_map`` (tensor name -> shard file) of a safetensors index, or a ``CheckpointError`` naming the file."""
    try:
        wm = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index ({e!r})") from None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
    return wm


def _read_all_tensors(root: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards named by ``model.safetensors.index.json``."""
    if (root / WEIGHTS).is_file() or not (root / INDEX).is_file():
        return _read_tensors(root / WEIGHTS)
    wm = read_weight_map(root / INDEX)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(set(wm.values())):
        if Path(f).name != f:
            raise CheckpointError(f"{root / INDEX} names an invalid shard file {f!r}")
        part = _read_tensors(root / f)
        tensors.update(part)
    missing = sorted(k for k in wm if k not in tensors)
    if missing:
        raise CheckpointError(f"{root / INDEX} lists tensors its shards lack, e.g. {missing[:3]}")
    return tensors


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split ``state`` (in key order) into groups of at most ``max_bytes`` (a larger tensor gets its own)."""
    out: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if out[-1] and size + n > max_bytes:
            out.append({})
            size = 0
        out[-1][k] = v
        size += n
    return out


def _build_skeleton(root: Path, dtype: torch.dtype | None) -> nn.Module:
    if not (root / "config.json").is_file():
        raise CheckpointError(f"{root} has no config.json; load_into(model, path) restores into a module you build")
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(root), local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"{root}/config.json cannot be read by transformers: {e}") from None
    from accelerate import init_empty_weights

    # Parameters on the meta device (filled from the file); buffers such as rotary frequencies are real.
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(cfg, **dtype_kwarg(dtype or torch.float32))


def load_into(model: nn.Module, path: str | os.PathLike[str], *, verify: bool = True) -> nn.Module:
    """Restore a checkpoint into ``model`` (same architecture, unquantized or on the meta device)."""
    root = Path(path)
    manifest = read_manifest(root, verify=verify)
    tensors = _read_all_tensors(root)
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"tensor {k} of {root} has {bad} NaN/Inf value(s); refusing to load it")
    for alias, target in manifest.get("tied", {}).items():
        if target not in tensors:
            raise CheckpointError(f"tied tensor {alias} points at {target}, which is not in {WEIGHTS}")
        tensors[alias] = tensors[target]
    for name, info in manifest["layers"].items():
        try:
            fmt = Format.from_dict(info["format"])
            shape = tuple(int(s) for s in info["shape"])
            dtype = getattr(torch, info["dtype"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"layer {name} in {MANIFEST} is invalid: {e}") from None
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"layer {name} of the checkpoint does not exist in the model") from None
        data = {}
        for tname in fmt.tensor_names():
            key = f"{name}.{tname}"
            if key not in tensors:
                raise CheckpointError(f"{WEIGHTS} lacks {key}, which format {fmt.kind} of layer {name} needs")
            data[tname] = tensors[key]
        q = QuantizedTensor(fmt, shape, dtype, data)
        _check_shapes(name, q)
        bias = tensors.get(f"{name}.bias")
        if isinstance(old, (nn.Linear, QuantLinear)):
            out_f = old.out_features
            if out_f != shape[0] or old.in_features != shape[1]:
                raise CheckpointError(f"layer {name}: checkpoint shape {shape} disagrees with the model's "
                                      f"({out_f}, {old.in_features})")
        set_submodule(model, name, QuantLinear(q, bias))
    state = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in manifest["layers"]}
    expected = {k for k in model.state_dict() if k.rsplit(".", 1)[0] not in manifest["layers"]}
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(f"{WEIGHTS} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"tensors in {WEIGHTS} do not fit the model: {e}") from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _check_shapes(name: str, q: QuantizedTensor) -> None:
    """Dequantizing must give the layer's shape; anything else means tensors disagree with the config."""
    try:
        try:
            meta = QuantizedTensor(q.format, q.shape, q.dtype, {k: v.to("meta") for k, v in q.data.items()})
            W = meta.dequantize()
        except (NotImplementedError, RuntimeError, TypeError):
            W = q.dequantize()  # formats that decode with numpy cannot run on meta tensors
    except Exception as e:  # a format's own shape checks (reshape, index) surface here
        raise CheckpointError(f"layer {name}: stored tensors {[tuple(v.shape) for v in q.data.values()]} "
                              f"do not fit format {q.format.kind} with shape {q.shape}: {e}") from None
    if tuple(W.shape) != tuple(q.shape):
        raise CheckpointError(f"layer {name}: tensors dequantize to {tuple(W.shape)}, the manifest says {q.shape}")


def load(path: str | os.PathLike[str], *, dtype: torch.dtype | None = None, verify: bool = True) -> nn.Module:
    """Load a lowbit checkpoint directory as a transformers model with its quantized layers."""
    root = Path(path)
    read_manifest(root, verify=False)
    model = _build_skeleton(root, dtype)
    load_into(model, root, verify=verify)
    model.eval()
    return model
