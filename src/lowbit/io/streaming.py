"""Quantize a transformers model larger than memory: one decoder block at a time, from memory-mapped shards.

The source is a ``save_pretrained`` directory (``config.json`` plus ``model.safetensors`` or
``model-0000k-of-0000N.safetensors`` shards and ``model.safetensors.index.json``). The model is built on the
meta device; only the embedding is materialized. For each decoder block ``i``:

1. its weights are read from the shards (``safetensors.safe_open``, which memory-maps the file; the handle is
   closed after the block, so no page of an earlier block stays mapped),
2. its Linear layers are quantized (calibrated methods call the runner's per-block step,
   :func:`lowbit.calibration.sequential.quantize_block`, GPTQ arXiv 2210.17323 §4, on the captured inputs),
3. the quantized block is written as its own shard ``model-{i+1:05d}-of-{N:05d}.safetensors`` (atomically,
   fsync'd) and its tensors are freed (the block goes back to the meta device),
4. a progress file is replaced atomically: ``blocks_done``, the layers written so far, each shard's sha256,
   and for calibrated methods the next block's input activations (``calib_state.safetensors``).

Peak memory is one block (float and quantized) plus the calibration activations at one block boundary plus
one layer's statistics. The output, built in ``.{out}.partial`` beside ``out`` and moved into place when
complete, is a lowbit checkpoint (:mod:`lowbit.io.checkpoint`, sharded) that :func:`lowbit.load` reads.

Resuming (``resume=True``) after a crash (even ``SIGKILL``) continues after the last finished block and
gives a byte-identical output to an uninterrupted run: every block's inputs are stored exactly, and the
partial run's fingerprint (method config, source files, calibration tokens) must match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.io.atomic import atomic_file
from lowbit.io.checkpoint import CHECKPOINT_VERSION, MANIFEST, CheckpointError, _sha256, read_weight_map
from lowbit.methods.base import MethodConfig
from lowbit.nn.linear import QuantLinear

__all__ = ["SUPPORTED_ARCHITECTURES", "SourceReader", "quantize_streaming", "shard_name", "write_synthetic_llama",
           "INDEX"]

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
PROGRESS = "progress.json"
CALIB_STATE = "calib_state.safetensors"
PROGRESS_VERSION = 1
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
"""transformers ``model_type`` values whose decoder blocks streaming has been tested on."""
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "generation_config.json", "chat_template.jinja")


def shard_name(i: int, n: int) -> str:
    """The ``save_pretrained`` name of shard ``i`` (1-based) of ``n``."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


class SourceReader:
    """The tensors of a transformers directory, read from its safetensors shards on demand (never pickle).

    Args:
        root: a directory with ``model.safetensors`` or ``model.safetensors.index.json`` + shards.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        index, single = self.root / INDEX, self.root / "model.safetensors"
        if index.is_file():
            self.weight_map: dict[str, str] = read_weight_map(index)
        elif single.is_file():
            self.weight_map = {k: single.name for k in self._keys(single)}
        else:
            raise CheckpointError(f"{self.root} has neither model.safetensors nor {INDEX}; only safetensors "
                                  "sources are read (no pickle)")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for f in sorted(set(self.weight_map.values())):
            p = self.root / f
            if Path(f).name != f or not p.is_file():
                raise CheckpointError(f"shard {f!r} named in {INDEX} is missing from {self.root}")
            with self._open(p) as h:
                for k in h.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                    sl = h.get_slice(k)
                    self.shapes[k] = tuple(sl.get_shape())
                    self.dtypes[k] = sl.get_dtype()
        missing = sorted(k for k in self.weight_map if k not in self.shapes)
        if missing:
            raise CheckpointError(f"{INDEX} names tensors its shards lack, e.g. {missing[:3]}")

    def _keys(self, p: Path) -> list[str]:
        with self._open(p) as h:
            return list(h.keys())

    @staticmethod
    @contextlib.contextmanager
    def _open(p: Path) -> Any:
        try:
            with safe_open(str(p), framework="pt") as h:
                yield h
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {p}: {e} (truncated or corrupt safetensors?)") from None

    def fingerprint(self) -> dict[str, Any]:
        """Names and sizes of the source files (what a resumed run must still see)."""
        files = sorted(set(self.weight_map.values()))
        return {f: (self.root / f).stat().st_size for f in files}

    def get(self, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Read ``names`` (grouped by shard; each shard mapped only while it is read) as ``dtype`` tensors."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            if n not in self.weight_map:
                raise CheckpointError(f"{self.root} lacks tensor {n!r}, which the model's config needs")
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for f, ns in by_file.items():
            with self._open(self.root / f) as h:
                for n in ns:
                    try:
                        out[n] = h.get_tensor(n).to(dtype)
                    except (SafetensorError, RuntimeError) as e:
                        raise CheckpointError(f"cannot read tensor {n} from {self.root / f}: {e}") from None
        return out


def _build_skeleton(root: Path, dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{root} has no config.json; streaming needs a transformers model directory")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from None
    mt = raw.get("model_type") if isinstance(raw, dict) else None
    if mt not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unknown or unsupported architecture model_type={mt!r} in {cfg_path}; streaming "
                         f"quantization supports {list(SUPPORTED_ARCHITECTURES)}")
    try:
        cfg = AutoConfig.from_pretrained(str(root), local_files_only=True)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(f"{cfg_path} cannot be read by transformers: {e}") from None
    from lowbit.io.hf import dtype_kwarg

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, **dtype_kwarg(dtype))
    return model.eval()


def _check_source(model: nn.Module, reader: SourceReader, tied: dict[str, str]) -> None:
    """Every parameter the config implies exists in the shards with the same shape (headers only)."""
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in tied:
            continue
        if name not in reader.shapes:
            raise CheckpointError(f"{reader.root} lacks tensor {name!r} (shape {tuple(p.shape)}) that config.json "
                                  "implies")
        if reader.shapes[name] != tuple(p.shape):
            raise CheckpointError(f"tensor {name} in {reader.root} has shape {reader.shapes[name]}, but config.json "
                                  f"implies {tuple(p.shape)}")
        if reader.dtypes[name] not in ("F32", "F16", "BF16", "F64"):
            raise CheckpointError(f"tensor {name} has dtype {reader.dtypes[name]}; a float source model is needed")


def _materialize(module: nn.Module, prefix: str, reader: SourceReader, dtype: torch.dtype) -> None:
    names = [n for n, _ in module.named_parameters()]
    got = reader.get([prefix + n for n in names], dtype)
    for n in names:
        t = got[prefix + n]
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"tensor {prefix + n} of {reader.root} has {bad} NaN/Inf value(s); refusing to quantize")
    module.load_state_dict({n: got[prefix + n] for n in names}, strict=False, assign=True)


def _to_meta(module: nn.Module) -> None:
    for _, m in module.named_modules():
        for k, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[k] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for k, b in list(m._buffers.items()):
            if b is not None and isinstance(m, QuantLinear):
                m._buffers[k] = torch.empty_like(b, device="meta")


def _release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed blocks of a few MB in its arenas, which grows
    RSS by tens of MB per block otherwise); a no-op where ``malloc_trim`` does not exist."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _write_shard(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"sha256": _sha256(path), "bytes": path.stat().st_size}


def _write_json(obj: Any, path: Path) -> None:
    with atomic_file(path, overwrite=True, mode="w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True))  # type: ignore[attr-defined]


def _quantize_block(model: nn.Module, config: MethodConfig, prefix: str, block: nn.Module, rel: list[str],
                    calls: list[Any] | None) -> list[Any] | None:
    """Quantize one materialized block; return the next block's calls (calibrated methods) or None."""
    from lowbit.calibration.sequential import quantize_block
    from lowbit.quantize import replace_linear

    def quantize_layer(n: str, lin: nn.Module, stats: dict[str, torch.Tensor] | None = None) -> None:
        replace_linear(model, prefix + n, lin, config, stats)  # type: ignore[arg-type]

    if calls is None:
        for n in rel:
            quantize_layer(n, block.get_submodule(n))
        return None
    return quantize_block(block, rel, config, calls, quantize_layer)


def _calib_sha(calibration: torch.Tensor | None) -> str | None:
    if calibration is None:
        return None
    return hashlib.sha256(calibration.to(torch.int64).contiguous().numpy().tobytes()).hexdigest() + \
        f":{tuple(calibration.shape)}"


def quantize_streaming(source: str | os.PathLike[str], out: str | os.PathLike[str], config: MethodConfig, *,
                       calibration: torch.Tensor | None = None, targets: Sequence[str] = ("Linear",),
                       ignore: Sequence[str] = (), dtype: torch.dtype = torch.float32, batch_size: int = 8,
                       resume: bool = False, overwrite: bool = False,
                       progress: Callable[..., Iterable[Any]] | None = None,
                       after_block: Callable[[int], None] | None = None) -> Path:
    """Quantize the transformers model in ``source`` block by block and write a sharded lowbit checkpoint.

    Args:
        source: transformers directory (``config.json`` + safetensors shards).
        out: output checkpoint directory; must not exist unless ``overwrite``.
        config: a method config (calibration-free, or one whose statistics are input statistics, e.g. GPTQ,
            AWQ, SmoothQuant; gradient statistics such as ``fisher`` need the whole model and are refused).
        calibration: ``(n_samples, seq_len)`` token ids for calibrated methods.
        targets, ignore: layer selection as in :func:`lowbit.quantize_`; only decoder-block layers.
        dtype: compute dtype the weights are read as.
        resume: continue a partial run left by a crash (``.{out}.partial``).
        overwrite: replace an existing ``out`` (and discard a partial run when not resuming).
        after_block: called with the block index after its shard and progress are on disk (tests, progress).

    Returns:
        ``Path(out)``.
    """
    from lowbit.calibration.sequential import capture_block_inputs, check_calibration, with_hidden
    from lowbit.calibration.stats import INPUT_STATS
    from lowbit.model.blocks import find_blocks
    from lowbit.model.walk import iter_targets

    if not isinstance(config, MethodConfig):
        raise TypeError(f"config must be a lowbit MethodConfig (e.g. RTNConfig), got {type(config).__name__}")
    src, dst = Path(source), Path(out)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"parent directory {dst.parent} does not exist")
    bad = [s for s in config.stats if s not in INPUT_STATS]
    if bad:
        raise ValueError(f"method {config.kind!r} needs statistic(s) {bad} that streaming cannot collect block by "
                         f"block; streaming supports methods whose statistics are in {list(INPUT_STATS)}")
    if config.stats or getattr(config, "prepare_block", None) is not None:
        if calibration is None:
            raise ValueError(f"method {config.kind!r} needs calibration token ids (n_samples, seq_len)")
        calibration = check_calibration(calibration)
    else:
        calibration = None
    progress = progress or (lambda it, **_: it)

    reader = SourceReader(src)
    model = _build_skeleton(src, dtype)
    path, blocks = find_blocks(model)
    cfg = model.config
    tied: dict[str, str] = {}
    if getattr(cfg, "tie_word_embeddings", False) and "lm_head.weight" not in reader.shapes:
        emb = model.get_input_embeddings()
        emb_name = next(n for n, m in model.named_modules() if m is emb)
        tied = {"lm_head.weight": f"{emb_name}.weight"}
    _check_source(model, reader, tied)
    selected = [n for n, _ in iter_targets(model, targets, ignore)]
    if not selected:
        raise ValueError(f"no Linear layer matched targets={list(targets)} ignore={list(ignore)}")
    outside = [n for n in selected if not n.startswith(f"{path}.")]
    if outside:
        raise ValueError(f"streaming quantizes decoder-block layers only; {outside} lie outside {path} "
                         "(add them to ignore, or quantize in memory with lowbit.quantize_)")
    n_blocks = len(blocks)
    n_shards = n_blocks + 1
    fingerprint = {"method": config.to_dict(), "source": reader.fingerprint(), "calibration": _calib_sha(calibration),
                   "targets": list(targets), "ignore": list(ignore), "dtype": str(dtype),
                   "batch_size": batch_size if calibration is not None else None,
                   "n_blocks": n_blocks}

    partial = dst.with_name(f".{dst.name}.partial")
    state: dict[str, Any] = {"version": PROGRESS_VERSION, "fingerprint": fingerprint, "blocks_done": 0,
                             "layers": {}, "files": {}, "weight_map": {}}
    if partial.exists():
        if resume:
            state = _read_progress(partial, fingerprint)
            for tmp in partial.glob(".*.tmp"):  # a write the crash interrupted (never moved into place)
                tmp.unlink()
            log.info("resuming %s after block %d/%d", dst, state["blocks_done"], n_blocks)
        elif overwrite:
            shutil.rmtree(partial)
        else:
            raise FileExistsError(f"a partial run exists at {partial}; pass resume=True (CLI: --resume) to continue "
                                  "it or overwrite=True (--overwrite) to start over")
    if not partial.exists():
        partial.mkdir()
    start = int(state["blocks_done"])
    try:
        with torch.no_grad():
            # non-block parameters (embeddings, final norm, lm_head) are small; the embedding is needed for inputs
            block_params = {f"{path}.{i}." for i in range(n_blocks)}
            rest = [n for n, _ in model.named_parameters(remove_duplicate=False)
                    if not any(n.startswith(p) for p in block_params) and n not in tied]
            calls = None
            if calibration is not None:
                emb = model.get_input_embeddings()
                emb_name = next(n for n, m in model.named_modules() if m is emb)
                _materialize(emb, f"{emb_name}.", reader, dtype)
                calls = capture_block_inputs(model, blocks[0], calibration, batch_size)
                if start > 0:
                    hidden = load_file(str(partial / CALIB_STATE))
                    calls = [with_hidden(c, hidden[f"h{j}"]) for j, c in enumerate(calls)]
            for i in progress(range(start, n_blocks), total=n_blocks - start, desc=f"{config.kind} blocks"):
                prefix = f"{path}.{i}."
                block = blocks[i]
                _materialize(block, prefix, reader, dtype)
                rel = [n[len(prefix):] for n in selected if n.startswith(prefix)]
                calls = _quantize_block(model, config, prefix, block, rel, calls)
                sd = {prefix + k: v for k, v in block.state_dict().items()}
                fname = shard_name(i + 1, n_shards)
                state["files"][fname] = _write_shard(sd, partial / fname)
                state["weight_map"].update({k: fname for k in sd})
                for n, mod in block.named_modules():
                    if isinstance(mod, QuantLinear):
                        state["layers"][prefix + n] = {"format": mod.format.to_dict(),
                                                       "shape": [mod.out_features, mod.in_features],
                                                       "dtype": str(mod.compute_dtype).removeprefix("torch.")}
                if calls is not None:
                    _write_shard({f"h{j}": c.args[0] if c.args else c.kwargs["hidden_states"]
                                  for j, c in enumerate(calls)}, partial / CALIB_STATE)
                state["blocks_done"] = i + 1
                _write_json(state, partial / PROGRESS)
                _to_meta(block)
                del sd
                _release_memory()
                log.info("%s: block %d/%d quantized and written (%s)", config.kind, i + 1, n_blocks, fname)
                if after_block is not None:
                    after_block(i)
            del calls
            _finalize(model, reader, partial, dst, state, rest, tied, n_shards, config, dtype, overwrite)
    except (ValueError, TypeError):
        if start == 0:  # bad input: leave nothing behind (a resumable partial run from before is kept)
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return dst


def _read_progress(partial: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    try:
        state = json.loads((partial / PROGRESS).read_text())
    except FileNotFoundError:
        state = None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{partial / PROGRESS} is corrupt ({e}); start over with overwrite=True") from None
    if state is None:  # killed before the first block finished: nothing to keep
        return {"version": PROGRESS_VERSION, "fingerprint": fingerprint, "blocks_done": 0, "layers": {},
                "files": {}, "weight_map": {}}
    if not isinstance(state, dict) or state.get("version") != PROGRESS_VERSION:
        raise CheckpointError(f"{partial / PROGRESS} has version {state.get('version') if isinstance(state, dict) else None!r};"
                              f" this lowbit resumes version {PROGRESS_VERSION} only")
    if json.loads(json.dumps(fingerprint)) != state.get("fingerprint"):
        raise ValueError(f"the partial run in {partial} was started with other inputs (method, source, calibration "
                         "or options); pass overwrite=True (--overwrite) to start over")
    for f, info in state["files"].items():
        p = partial / f
        if not p.is_file() or p.stat().st_size != info["bytes"] or _sha256(p) != info["sha256"]:
            raise CheckpointError(f"shard {p} of the partial run is missing or corrupt; start over with overwrite=True")
    return state


def _finalize(model: nn.Module, reader: SourceReader, partial: Path, dst: Path, state: dict[str, Any],
              rest: list[str], tied: dict[str, str], n_shards: int, config: MethodConfig, dtype: torch.dtype,
              overwrite: bool) -> None:
    tensors = reader.get(rest, dtype)
    for k, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {k} of {reader.root} has NaN/Inf values; refusing to quantize")
    fname = shard_name(n_shards, n_shards)
    state["files"][fname] = _write_shard(tensors, partial / fname)
    state["weight_map"].update({k: fname for k in tensors})
    del tensors
    sizes = {f: info["bytes"] for f, info in state["files"].items()}
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(state["weight_map"].items()))}
    (partial / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    model.config.to_json_file(str(partial / "config.json"))
    for name in _TOKENIZER_FILES:
        if (reader.root / name).is_file():
            shutil.copyfile(reader.root / name, partial / name)
    (partial / CALIB_STATE).unlink(missing_ok=True)
    (partial / PROGRESS).unlink(missing_ok=True)
    files = {p.name: ({"sha256": _sha256(p), "bytes": p.stat().st_size} if p.name not in state["files"]
                      else state["files"][p.name]) for p in sorted(partial.iterdir()) if p.is_file()}
    manifest = {"lowbit_checkpoint": CHECKPOINT_VERSION, "method": config.to_dict(), "layers": state["layers"],
                "tied": tied, "files": files, "extra": {"streaming": True}}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    old = None
    if dst.exists():
        if not overwrite:
            raise FileExistsError(f"{dst} appeared while quantizing; pass overwrite=True to replace it")
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(partial, dst)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def write_synthetic_llama(path: str | os.PathLike[str], *, hidden_size: int, intermediate_size: int,
                          num_hidden_layers: int, vocab_size: int = 1024, num_attention_heads: int = 16,
                          seed: int = 0, std: float = 0.02) -> int:
    """Write a random-weight Llama ``save_pretrained`` directory shard by shard (one shard per decoder block).

    Only one block's float32 weights exist in memory at a time, so models larger than memory can be made for
    tests and benchmarks. Returns the total float32 bytes written.
    """
    from transformers import LlamaConfig

    root = Path(path)
    root.mkdir(parents=True, exist_ok=False)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                      num_key_value_heads=num_attention_heads, max_position_embeddings=512,
                      tie_word_embeddings=False, torch_dtype="float32")
    cfg.to_json_file(str(root / "config.json"))
    h, f = hidden_size, intermediate_size
    shapes = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (h, h), "self_attn.v_proj.weight": (h, h),
              "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
              "mlp.down_proj.weight": (h, f)}
    n = num_hidden_layers + 1
    weight_map: dict[str, str] = {}
    total = 0
    g = torch.Generator().manual_seed(seed)
    for i in range(num_hidden_layers):
        t = {f"model.layers.{i}.{k}": torch.randn(s, generator=g) * std for k, s in shapes.items()}
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h)
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h)
        fname = shard_name(i + 1, n)
        save_file(t, str(root / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in t})
        total += sum(v.numel() * 4 for v in t.values())
        del t
    t = {"model.embed_tokens.weight": torch.randn(vocab_size, h, generator=g) * std, "model.norm.weight": torch.ones(h),
         "lm_head.weight": torch.randn(vocab_size, h, generator=g) * std}
    save_file(t, str(root / shard_name(n, n)), metadata={"format": "pt"})
    weight_map.update({k: shard_name(n, n) for k in t})
    total += sum(v.numel() * 4 for v in t.values())
    (root / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total
